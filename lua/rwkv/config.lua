-- rwkv.nvim: one typed, validated configuration.
--
-- Editor-side options live at the top level; engine options live in `engine` and are
-- passed verbatim to Python (rwkv_engine.config.EngineConfig.from_dict), which fills in
-- its own defaults. Defaults are documented in doc/rwkv.txt (`:help rwkv-options`).
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
    annotation = true, -- "(i/n)" after the ghost text when the float is off
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
  engine = {}, -- see :help rwkv-engine-options; nil keys use the engine's defaults
}

-- Engine options: name -> Lua type(s). Must match EngineConfig's fields (a test checks).
M.engine_types = {
  model = "string",
  download_dir = "string",
  device = "string",
  dtype = "string",
  threads = "number",
  candidates = "number",
  max_tokens = "number",
  max_lines = "number",
  temperature = "number",
  top_p = "number",
  top_k = "number",
  alpha_presence = "number",
  alpha_frequency = "number",
  alpha_decay = "number",
  seed = "number",
  stop = "table",
  time_budget_ms = "number",
  n_prefix = "number",
  n_suffix = "number",
  near_prefix = "number",
  near_suffix = "number",
  max_line_suffix = "number",
  ring_n_chunks = "number",
  ring_chunk_size = "number",
  ring_queue = "number",
  cache_device_mb = "number",
  cache_host_mb = "number",
  cache_disk_mb = "number",
  cache_dir = "string",
  max_line_bytes = "number",
  prefill_chunk = "number",
  tail_checkpoints = "number",
}

-- The engine defaults the editor side needs itself (window of lines, auto-trigger rule,
-- context chunk size). Must equal EngineConfig's defaults (a test checks).
M.engine_mirror = {
  n_prefix = 256,
  n_suffix = 64,
  max_line_suffix = 8,
  ring_chunk_size = 64,
  ring_queue = 16,
  candidates = 4,
  max_line_bytes = 1024,
}

local allowed_devices = { auto = true, cpu = true, cuda = true }
local allowed_dtypes = { auto = true, fp16 = true, bf16 = true, fp32 = true, int8 = true }

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

local function validate_engine(e)
  check_unknown("engine.", e, M.engine_types)
  for name, t in pairs(M.engine_types) do
    check_type("engine." .. name, e[name], t, true)
  end
  if e.device and not allowed_devices[e.device] then
    fail("engine.device must be one of auto, cpu, cuda")
  end
  if e.dtype and not allowed_dtypes[e.dtype] then
    fail("engine.dtype must be one of auto, fp16, bf16, fp32, int8")
  end
  if e.model ~= nil and vim.trim(e.model) == "" then
    fail("engine.model must be a path or a model name (or nil for the default model)")
  end
  check_range("engine.candidates", e.candidates, 1, 16)
  check_range("engine.max_tokens", e.max_tokens, 1, 4096)
  check_range("engine.temperature", e.temperature, 0, 10)
  check_range("engine.top_p", e.top_p, 0, 1)
  for _, n in ipairs({ "n_prefix", "n_suffix", "max_line_suffix", "ring_n_chunks", "top_k",
    "cache_device_mb", "cache_host_mb", "cache_disk_mb" }) do
    check_range("engine." .. n, e[n], 0)
  end
  check_range("engine.ring_chunk_size", e.ring_chunk_size, 3)
  check_range("engine.max_line_bytes", e.max_line_bytes, 64, 1048576)
  if e.stop ~= nil then
    for i, s in ipairs(e.stop) do
      if type(s) ~= "string" or s == "" then
        fail(("engine.stop[%d] must be a non-empty string"):format(i))
      end
    end
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
  for _, group in ipairs({ "ghost", "float", "keymaps", "context", "engine" }) do
    check_type(group, c[group], "table")
  end
  check_unknown("ghost.", c.ghost, M.defaults.ghost)
  check_type("ghost.annotation", c.ghost.annotation, "boolean")
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
    if M.engine_types[k] ~= nil and M.defaults[k] == nil then
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

--- An engine option as the engine will see it (the user's value or the engine default).
---@param name string
function M.engine(name)
  local v = M.current.engine[name]
  if v == nil then
    return M.engine_mirror[name]
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
