-- rwkv.nvim: one typed, validated configuration.
--
-- Editor-side options live at the top level; their defaults and checks derive from one
-- schema, rwkv.editor_options. Engine options live in `engine` and are passed verbatim to
-- Python (rwkv_engine.pipeline.config.EngineConfig.from_dict), which fills in its own
-- defaults. setup() checks them first against the table generated from
-- that schema (rwkv.engine_options), so a bad engine option fails here, in the engine's
-- words, before anything is sent. Defaults: doc/rwkv.txt (`:help rwkv-options`).
local M = {}

---@alias rwkv.Config table<string, any> the options of setup(): rwkv.editor_options + engine

-- Editor options (types, defaults, ranges, docs): rwkv.editor_options, one schema that the
-- defaults and checks below derive from and tools/gen_config.py writes the help from.
local editor_options = require("rwkv.editor_options")

--- The defaults of a list of options: groups become tables; optional options stay nil.
local function defaults_of(options)
  local out = {}
  for _, opt in ipairs(options) do
    if opt.fields then
      out[opt.name] = defaults_of(opt.fields)
    else
      out[opt.name] = vim.deepcopy(opt.default)
    end
  end
  return out
end

--- Every editor option's default, shaped as setup() takes them (groups as tables);
--- engine = {}: the engine fills in its own.
---@type rwkv.Config
M.defaults = defaults_of(editor_options)

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

--- The set of the names of `options`.
local function names_of(options)
  local names = {}
  for _, opt in ipairs(options) do
    names[opt.name] = true
  end
  return names
end

--- Raise on a key of `given` that is not the name of one of `options`.
local function check_unknown(prefix, given, options)
  local known = names_of(options)
  for k in pairs(given) do
    if not known[k] then
      local names = vim.tbl_keys(known)
      table.sort(names)
      fail(("unknown option %s%s (known: %s)"):format(prefix, tostring(k), table.concat(names, ", ")))
    end
  end
end

-- -- editor options: the rules of rwkv.editor_options ------------------------------------

--- Check one value option (`name` is its full name, e.g. "ghost.max_lines").
local function check_option(name, opt, v)
  local types = vim.split(opt.type, "|", { plain = true })
  if v == false and vim.tbl_contains(types, "false") then
    return -- turned off
  end
  types = vim.tbl_filter(function(t)
    return t ~= "false"
  end, types)
  check_type(name, v, table.concat(types, "|"), opt.optional)
  if v == nil then
    return
  end
  if opt.min then
    check_range(name, v, opt.min, opt.max)
  end
  if opt.integer and v ~= math.floor(v) then
    fail(("%s = %s must be a whole number"):format(name, tostring(v)))
  end
  local broken = (opt.nonempty and v == "")
    or (opt.contains and type(v) == "string" and not v:find(opt.contains, 1, true))
  if opt.items and type(v) == "table" then
    for i, item in pairs(v) do
      broken = broken or type(i) ~= "number" or type(item) ~= opt.items or item == ""
    end
  end
  if broken then
    fail(name .. " " .. opt.must)
  end
  if opt.choices and not vim.tbl_contains(opt.choices, v) then
    fail(("%s = %q must be one of %s"):format(name, v, table.concat(opt.choices, ", ")))
  end
  if opt.map_of then
    for key, item in pairs(v) do
      check_type(("%s[%q]"):format(name, tostring(key)), item, opt.map_of)
    end
  end
end

--- Check a table of options against `options` (a group's fields or the top level).
local function check_options(prefix, given, options)
  check_unknown(prefix, given, options)
  for _, opt in ipairs(options) do
    local name = prefix .. opt.name
    if opt.fields then
      check_type(name, given[opt.name], "table")
      check_options(name .. ".", given[opt.name], opt.fields)
    else
      check_option(name, opt, given[opt.name])
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
  check_options("", c, editor_options)
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
  local editor_names = names_of(editor_options)
  for k, v in pairs(opts) do
    if engine_options.by_name[k] ~= nil and not editor_names[k] then
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
