-- rwkv.nvim: one typed, validated configuration.
--
-- Editor-side options live at the top level; engine options live in `engine` and are
-- passed verbatim to Python (rwkv_engine.pipeline.config.EngineConfig.from_dict), which
-- fills in its own defaults. setup() checks them first against the table generated from
-- that schema (rwkv.engine_options), so a bad engine option fails here, in the engine's
-- words, before anything is sent. Defaults: doc/rwkv.txt (`:help rwkv-options`).
local M = {}

---@class rwkv.Keymaps
---@field accept string|false        accept the whole suggestion
---@field accept_line string|false   accept one line
---@field accept_word string|false   accept one word
---@field dismiss string|false
---@field next string|false          next candidate
---@field prev string|false          previous candidate
---@field trigger string|false       request a suggestion now (ignores max_line_suffix)
---@field pick string|false          format with %d (1..9): accept candidate N

---@class rwkv.Config
M.defaults = {
  enabled = true, -- suggestions on at start (:RwkvToggle flips it)
  auto_trigger = true, -- suggest while typing; false = only on the trigger key
  debounce_ms = 75,
  filetypes = { -- filetype -> bool; "*" is the fallback
    ["*"] = true,
    gitcommit = false,
    gitrebase = false,
    help = false,
    hgcommit = false,
    svn = false,
    cvs = false,
  },
  notify = true, -- loading / ready notices
  debug = false, -- log requests (buffer text!) to stdpath("log")/rwkv.log; off: buffer text is never logged
  ghost = {
    enabled = true, -- the suggestion as ghost text at the cursor (false: e.g. when a completion menu shows it)
    annotation = true, -- "(i/n)" after the ghost text when the float is off
    max_lines = 3, -- most lines of ghost text (the first + virtual lines below it); 0: all
  },
  float = {
    enabled = true, -- the candidate window (shown with 2 or more candidates)
    max_lines = 3, -- lines shown per candidate
    max_width = 80,
    border = "rounded",
  },
  keymaps = {
    accept = "<Tab>",
    accept_line = "<S-Tab>",
    accept_word = "<C-Right>",
    dismiss = "<C-]>",
    next = "<M-]>",
    prev = "<M-[>",
    trigger = "<M-\\>",
    pick = "<M-%d>",
  },
  context = {
    yank = true, -- yanked text (3+ lines) becomes extra context
    buf_enter = true, -- lines around the cursor when entering / leaving a buffer
    save = true, -- lines around the cursor on :write
    prime_on_idle = true, -- compute queued chunks' states on CursorHold
  },
  python = { -- where the Python side runs (:help rwkv-option-python)
    host = "auto", -- "auto": the plugin's own host when its environment exists, else the manifest; "own" | "manifest"
    interpreter = "python3", -- the Python that :RwkvBuild makes the environment with
    -- env = nil,             -- the plugin's virtualenv (nil: stdpath("data")/rwkv.nvim/venv)
    -- torch_spec = nil,      -- torch requirement for :RwkvBuild (nil: $TORCH_SPEC or "torch==2.13.0")
    -- torch_index_url = nil, -- extra index for torch, e.g. "https://download.pytorch.org/whl/cu124"
  },
  lsp = { -- an in-process language server: completion menus list the candidates (:help rwkv-lsp)
    enabled = false, -- attach it to the buffers that get suggestions
    trigger_characters = true, -- true: every printable character; a list of strings; false: none
  },
  engine = {}, -- see :help rwkv-engine-options; nil keys use the engine's defaults
}

-- the python = {...} keys (env, torch_spec and torch_index_url default to nil) and their types
M.python_keys = { host = "string", interpreter = "string", env = "string", torch_spec = "string",
  torch_index_url = "string" }
M.python_hosts = { "auto", "own", "manifest" }

-- Engine options (types, defaults, ranges, docs): generated from the engine's own schema
-- (rwkv_engine.pipeline.config.EngineConfig) by tools/gen_config.py.
local engine_options = require("rwkv.engine_options")

---@type rwkv.Config
M.current = vim.deepcopy(M.defaults)

local function fail(msg)
  error("rwkv.setup: " .. msg, 0)
end

local has_011 = vim.fn.has("nvim-0.11") == 1

--- vim.validate with our error prefix; `expected` is "type" or "type|type".
local function check_type(name, value, expected, optional)
  local types = vim.split(expected, "|", { plain = true })
  local ok, err
  if has_011 then
    ok, err = pcall(vim.validate, name, value, types, optional or false)
  else
    ok, err = pcall(vim.validate, { [name] = { value, types, optional or false } })
  end
  if not ok then
    fail(tostring(err):gsub("^.-:%d+: ", ""))
  end
end

local function check_range(name, value, lo, hi)
  if value ~= nil and (value < lo or (hi and value > hi) or value ~= value) then
    fail(("%s = %s must be in %s..%s"):format(name, tostring(value), lo, hi or "inf"))
  end
end

local function check_unknown(prefix, given, known)
  for k in pairs(given) do
    if known[k] == nil then
      local names = vim.tbl_keys(known)
      table.sort(names)
      fail(("unknown option %s%s (known: %s)"):format(prefix, tostring(k), table.concat(names, ", ")))
    end
  end
end

-- -- engine options: the engine's rules and words (EngineConfig.__post_init__/validate) -----

local function finite(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

--- A value as the engine's messages print it (Python's repr, near enough): 'cpu', 0.0, 17.
local function show(value, opt)
  if type(value) == "string" then
    return "'" .. value .. "'"
  elseif type(value) == "number" then
    if value ~= value then
      return "nan"
    elseif not finite(value) then
      return value > 0 and "inf" or "-inf"
    elseif opt and opt.type == "number" and value == math.floor(value) and math.abs(value) < 1e16 then
      return ("%.1f"):format(value) -- the engine has made it a float by then: 0 -> 0.0
    end
    return tostring(value)
  end
  return (vim.inspect(value, { newline = " ", indent = "" })) -- one line: { "a", "" }
end

local function engine_fail(opt, value, must)
  fail(("engine option %s = %s: %s"):format(opt.name, show(value, opt), must))
end

--- Type check (Python: _coerce). A string is a list of one for "table" options; an empty
--- table may be a dict (vim.empty_dict()), as Python also accepts.
local function has_type(opt, v)
  local t = opt.type
  if t == "integer" then
    return finite(v) and v == math.floor(v)
  elseif t == "number" then
    return finite(v)
  elseif t == "table" then
    return type(v) == "string" or (type(v) == "table" and (next(v) == nil or vim.islist(v)))
  end
  return type(v) == t -- "string", "boolean"
end

--- Value check (Python: _allowed); `eff` holds every option's effective value.
local function allowed(opt, v, eff)
  if v == nil then
    return true
  end
  if opt.type == "table" then
    for _, s in ipairs(type(v) == "string" and { v } or v) do
      if type(s) ~= "string" or s == "" then
        return false
      end
    end
    return true
  end
  if opt.choices and not vim.tbl_contains(opt.choices, v) then
    return false
  end
  if opt.nonblank and not v:find("%S") then
    return false
  end
  local lo, hi = opt.min, opt.max
  if opt.max_option then
    hi = eff[opt.max_option]
  end
  if lo and (v < lo or (opt.min_open and v == lo)) then
    return false
  end
  return hi == nil or v <= hi
end

--- Raise on the first engine option the engine would reject, in the engine's order:
--- unknown keys, then types, then the near_* clamp, then values. vim.NIL = not set.
local function validate_engine(e)
  local unknown = {}
  for k in pairs(e) do
    if not engine_options.by_name[k] then
      table.insert(unknown, k)
    end
  end
  if #unknown > 0 then
    table.sort(unknown, function(a, b)
      return tostring(a) < tostring(b)
    end)
    local names = vim.tbl_map(function(o)
      return o.name
    end, engine_options.options)
    table.sort(names)
    fail(("unknown engine option %s (known: %s)"):format(show(unknown[1]), table.concat(names, ", ")))
  end
  local eff = {}
  for _, opt in ipairs(engine_options.options) do
    local v = e[opt.name]
    if v == vim.NIL then
      v = nil
    end
    if v ~= nil and not has_type(opt, v) then
      engine_fail(opt, v, engine_options.type_must[opt.type])
    end
    if v == nil then
      v = opt.default
    end
    eff[opt.name] = v
  end
  for _, opt in ipairs(engine_options.options) do
    local limit = opt.max_option and eff[opt.max_option]
    if limit and limit >= 0 then
      eff[opt.name] = math.min(eff[opt.name], limit)
    end
  end
  for _, opt in ipairs(engine_options.options) do
    if not allowed(opt, eff[opt.name], eff) then
      engine_fail(opt, eff[opt.name], opt.must)
    end
  end
  -- cross-field, after the per-option checks (EngineConfig.validate): a server needs its address
  if eff.backend ~= "local" and eff.url == nil then
    fail(("engine option url = nil: must be set when backend is '%s'"):format(eff.backend))
  end
end

--- Validate a user table (already merged with defaults). Raises "rwkv.setup: ..." on error.
---@param c rwkv.Config
function M.validate(c)
  check_unknown("", c, M.defaults)
  check_type("enabled", c.enabled, "boolean")
  check_type("auto_trigger", c.auto_trigger, "boolean")
  check_type("debounce_ms", c.debounce_ms, "number")
  check_range("debounce_ms", c.debounce_ms, 0, 10000)
  check_type("notify", c.notify, "boolean")
  check_type("debug", c.debug, "boolean")
  check_type("filetypes", c.filetypes, "table")
  for ft, on in pairs(c.filetypes) do
    check_type(("filetypes[%q]"):format(tostring(ft)), on, "boolean")
  end
  for _, group in ipairs({ "ghost", "float", "keymaps", "context", "python", "lsp", "engine" }) do
    check_type(group, c[group], "table")
  end
  check_unknown("ghost.", c.ghost, M.defaults.ghost)
  check_type("ghost.enabled", c.ghost.enabled, "boolean")
  check_type("ghost.annotation", c.ghost.annotation, "boolean")
  check_type("ghost.max_lines", c.ghost.max_lines, "number")
  check_range("ghost.max_lines", c.ghost.max_lines, 0, 100)
  if c.ghost.max_lines ~= math.floor(c.ghost.max_lines) then
    fail(("ghost.max_lines = %s must be a whole number"):format(tostring(c.ghost.max_lines)))
  end
  check_unknown("float.", c.float, M.defaults.float)
  check_type("float.enabled", c.float.enabled, "boolean")
  check_type("float.max_lines", c.float.max_lines, "number")
  check_range("float.max_lines", c.float.max_lines, 1, 50)
  check_type("float.max_width", c.float.max_width, "number")
  check_range("float.max_width", c.float.max_width, 10, 500)
  check_type("float.border", c.float.border, "string|table")
  check_unknown("keymaps.", c.keymaps, M.defaults.keymaps)
  for name, lhs in pairs(c.keymaps) do
    if lhs ~= false then
      check_type("keymaps." .. name, lhs, "string")
      if lhs == "" then
        fail("keymaps." .. name .. " must be a key or false (not an empty string)")
      end
    end
  end
  if c.keymaps.pick and not c.keymaps.pick:find("%d", 1, true) then
    fail("keymaps.pick must contain %d (e.g. \"<M-%d>\") or be false")
  end
  check_unknown("python.", c.python, M.python_keys)
  for name, t in pairs(M.python_keys) do
    check_type("python." .. name, c.python[name], t, true)
    if c.python[name] == "" then
      fail("python." .. name .. " must not be empty (nil uses the default)")
    end
  end
  if not vim.tbl_contains(M.python_hosts, c.python.host) then
    fail(("python.host = %q must be one of %s"):format(c.python.host, table.concat(M.python_hosts, ", ")))
  end
  check_unknown("lsp.", c.lsp, M.defaults.lsp)
  check_type("lsp.enabled", c.lsp.enabled, "boolean")
  check_type("lsp.trigger_characters", c.lsp.trigger_characters, "boolean|table")
  if type(c.lsp.trigger_characters) == "table" then
    for i, ch in pairs(c.lsp.trigger_characters) do
      if type(i) ~= "number" or type(ch) ~= "string" or ch == "" then
        fail("lsp.trigger_characters must be true, false or a list of non-empty strings")
      end
    end
  end
  check_unknown("context.", c.context, M.defaults.context)
  for name in pairs(M.defaults.context) do
    check_type("context." .. name, c.context[name], "boolean")
  end
  validate_engine(c.engine)
end

--- Merge `opts` over the defaults, validate, and make it current. Raises on a bad option.
---@param opts table|nil
---@return rwkv.Config
function M.apply(opts)
  if opts ~= nil and type(opts) ~= "table" then
    fail("setup() takes a table, got " .. type(opts))
  end
  opts = vim.deepcopy(opts or {})
  -- shorthand: engine options may also be given at the top level (setup({ model = ... }))
  for k, v in pairs(opts) do
    if engine_options.by_name[k] ~= nil and M.defaults[k] == nil then
      opts.engine = opts.engine or {}
      if type(opts.engine) == "table" and opts.engine[k] == nil then
        opts.engine[k] = v
      end
      opts[k] = nil
    end
  end
  -- filetypes and engine replace key by key; everything else merges deeply
  local merged = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts)
  M.validate(merged)
  M.current = merged
  return merged
end

--- An engine option as the engine will see it: the user's value or the engine default,
--- near_prefix/near_suffix lowered to n_prefix/n_suffix as the engine does.
---@param name string
function M.engine(name)
  local opt = engine_options.by_name[name] or error("rwkv: unknown engine option " .. tostring(name))
  local v = M.current.engine[name]
  if v == nil or v == vim.NIL then
    v = vim.deepcopy(opt.default)
  end
  if opt.max_option then
    local limit = M.engine(opt.max_option)
    if limit >= 0 and v > limit then
      v = limit
    end
  end
  return v
end

--- The engine table to send to Python (only what the user set).
function M.engine_opts()
  return vim.deepcopy(M.current.engine)
end

--- Options of the Python host side that are not engine options (logging).
function M.host_opts()
  return {
    debug = M.current.debug,
    log_file = vim.fs.joinpath(vim.fn.stdpath("log"), "rwkv.log"),
  }
end

--- Whether suggestions are allowed in `buf` (filetype rules, buftype, b:rwkv_enabled).
---@param buf integer
function M.buffer_allowed(buf)
  if not vim.api.nvim_buf_is_valid(buf) then
    return false
  end
  if vim.b[buf].rwkv_enabled == false then
    return false
  end
  if vim.b[buf].rwkv_enabled == true then
    return true
  end
  local bo = vim.bo[buf]
  local bt = bo.buftype
  if bt ~= "" and bt ~= "acwrite" then
    return false -- terminal, help, prompt, quickfix, nofile, ...
  end
  if not bo.modifiable or bo.readonly then
    return false -- nothing to insert into
  end
  local ft = vim.bo[buf].filetype
  local rule = M.current.filetypes[ft]
  if rule == nil then
    rule = M.current.filetypes["*"]
  end
  return rule ~= false
end

return M
