-- rwkv.nvim: local RWKV-7 code completion. Public Lua API:
--   require("rwkv").setup(opts)        validate and apply options (:help rwkv-options)
--   .enable() .disable() .toggle()     suggestions on / off
--   .status()                          {enabled, model, device, loaded, error, last = {...}}
--   .statusline()                      a short string for the statusline
-- The model loads in the Python host on the first InsertEnter, never at start-up.
local config = require("rwkv.config")
local remote = require("rwkv.remote")

local api = vim.api
local M = {}

local configured = false

-- engine state as reported by Python's on_event callbacks
local engine = {
  loading = false,
  loaded = false,
  model = nil, ---@type string|nil
  device = nil, ---@type string|nil
  dtype = nil, ---@type string|nil
  load_ms = nil, ---@type number|nil
  error = nil, ---@type string|nil
  warnings = {}, ---@type string[]  degraded but working (CPU fallback, no disk cache, ...)
}
local notified_errors = {}

local function notify(msg, level)
  vim.notify(msg, level or vim.log.levels.INFO, { title = "rwkv" })
end

local function define_highlights()
  require("rwkv.ghost").define_highlights()
  require("rwkv.float").define_highlights()
end

local function create_autocmds()
  local suggest = require("rwkv.suggest")
  local group = api.nvim_create_augroup("rwkv", { clear = true })
  local function au(events, fn, desc)
    api.nvim_create_autocmd(events, { group = group, callback = fn, desc = "rwkv: " .. desc })
  end
  au("ColorScheme", define_highlights, "highlight links")
  au("InsertEnter", function(ev)
    if config.current.enabled and config.buffer_allowed(ev.buf) then
      vim.schedule(function()
        M.start_engine()
        suggest.on_change()
      end)
    end
  end, "load the model on first use")
  au({ "TextChangedI", "CursorMovedI" }, suggest.on_change, "suggest while typing")
  au("InsertLeave", suggest.reset, "hide the suggestion")
  au({ "BufLeave", "CompleteChanged" }, suggest.hide, "hide the suggestion")
end

--- Validate and apply options. Returns false (after one error message) on a bad option.
---@param opts table|nil
function M.setup(opts)
  local ok, err = pcall(config.apply, opts)
  if not ok then
    notify(tostring(err), vim.log.levels.ERROR)
    return false
  end
  configured = true
  define_highlights()
  create_autocmds()
  require("rwkv.keymaps").setup(config.current.keymaps)
  require("rwkv.context").setup(config.current.context)
  if remote.state.started then
    remote.start(config.engine_opts()) -- new engine options take effect now
  end
  return true
end

--- setup() with defaults unless the user already called it (plugin/rwkv.lua).
function M.ensure_setup()
  if not configured then
    M.setup()
  end
end

--- Start the engine (the model loads in the background). Called on the first InsertEnter.
function M.start_engine()
  if remote.state.started or remote.state.failed then
    return
  end
  engine.loading = true
  if remote.start(config.engine_opts()) then
    require("rwkv.context").flush()
  else
    engine.loading = false
  end
end

--- From Python (worker thread -> nvim.async_call): "loading" | "ready" | "error" | "progress" | "download".
---@param kind string
---@param info table
function M.on_event(kind, info)
  info = info or {}
  local quiet = not config.current.notify
  if kind == "loading" then
    engine.loading, engine.error, engine.model = true, nil, info.model or engine.model
    if not quiet then
      notify(("rwkv: loading model %s …"):format(info.model or "(default)"))
    end
  elseif kind == "ready" then
    engine.loading, engine.loaded = false, true
    engine.model, engine.device, engine.dtype, engine.load_ms = info.model, info.device, info.dtype, info.load_ms
    if not quiet then
      notify(("rwkv: %s ready on %s (%d ms)"):format(info.model or "model", info.device or "?",
        math.floor(tonumber(info.load_ms) or 0)))
    end
  elseif kind == "progress" then
    if not quiet and info.message then
      notify("rwkv: " .. info.message)
    end
  elseif kind == "error" then
    engine.loading = false
    engine.error = info.message or "unknown error"
    if not notified_errors[engine.error] then
      notified_errors[engine.error] = true
      notify("rwkv: " .. engine.error, vim.log.levels.ERROR)
    end
  elseif kind == "warning" then
    local msg = info.message or "unknown problem"
    if not notified_errors[msg] then -- each warning once per session
      notified_errors[msg] = true
      engine.warnings[#engine.warnings + 1] = msg
      notify("rwkv: " .. msg, vim.log.levels.WARN)
    end
  elseif kind == "download" then
    notify("rwkv: " .. (info.message or ""), info.ok and vim.log.levels.INFO or vim.log.levels.ERROR)
  end
end

function M.is_enabled()
  return config.current.enabled
end

function M.enable()
  M.ensure_setup()
  config.current.enabled = true
end

function M.disable()
  config.current.enabled = false
  require("rwkv.suggest").reset()
end

function M.toggle()
  if config.current.enabled then
    M.disable()
  else
    M.enable()
  end
  return config.current.enabled
end

--- Editor-side status; never calls Python (safe in a statusline).
function M.status()
  local last = require("rwkv.suggest").state.last or {}
  return {
    enabled = config.current.enabled,
    loaded = engine.loaded,
    loading = engine.loading,
    model = engine.model or config.current.engine.model,
    device = engine.device or config.current.engine.device,
    error = engine.error or remote.state.failed,
    last = {
      reused_tokens = last.reused_tokens,
      prefilled_tokens = last.prefilled_tokens,
      decoded_tokens = last.decoded_tokens,
      ms_prefill = last.ms_prefill,
      ms_decode = last.ms_decode,
      ms_total = last.ms_total,
      candidates = last.candidates,
    },
  }
end

--- A short statusline string: "rwkv:off", "rwkv:…", "rwkv:err", "rwkv:2/4", "rwkv:on".
function M.statusline()
  if not config.current.enabled then
    return "rwkv:off"
  end
  if remote.state.failed or (engine.error and not engine.loaded) then
    return "rwkv:err" -- unusable; an error of one request while loaded only shows in :RwkvStatus
  end
  local items, index = require("rwkv.suggest").candidates()
  if items then
    return ("rwkv:%d/%d"):format(index, #items)
  end
  if engine.loading and not engine.loaded then
    return "rwkv:…"
  end
  return "rwkv:on"
end

local function fmt_bytes(n)
  if type(n) ~= "number" then
    return tostring(n)
  end
  return ("%.1f MB"):format(n / 1048576)
end

--- Lines for :RwkvStatus (asks Python when the host runs).
function M.status_lines()
  local st = M.status()
  local py = remote.status()
  local lines = {}
  local function add(fmt, ...)
    lines[#lines + 1] = fmt:format(...)
  end
  add("rwkv: suggestions %s", st.enabled and "enabled" or "disabled")
  if remote.state.failed then
    add("python: %s", remote.state.failed)
  elseif not remote.state.started then
    add("engine: not started (the model loads on the first InsertEnter)")
  end
  local model = py.model or st.model or "(default model)"
  local where = py.device or st.device or "?"
  local loaded = py.loaded
  if loaded == nil then
    loaded = st.loaded
  end
  add("model: %s  device: %s  dtype: %s  %s", model, where, py.dtype or engine.dtype or "?",
    loaded and "loaded" or (st.loading and "loading" or "not loaded"))
  local err = py.error or st.error
  if err and err ~= vim.NIL and err ~= remote.state.failed then
    add("error: %s", err)
  end
  for _, w in ipairs(engine.warnings) do
    add("warning: %s", w)
  end
  if type(py.cache) == "table" then
    local parts = {}
    for name, v in pairs(py.cache) do
      if type(v) == "table" and v.bytes ~= nil then -- a tier: device / host / disk
        parts[#parts + 1] = ("%s %s/%s (%s entries)"):format(name, fmt_bytes(v.bytes), fmt_bytes(v.budget),
          tostring(v.entries or "?"))
      elseif type(v) == "table" then -- counters: hits, ring, line cache ...
        local kv = {}
        for k, x in pairs(v) do
          kv[#kv + 1] = ("%s=%s"):format(k, tostring(x))
        end
        table.sort(kv)
        parts[#parts + 1] = ("%s {%s}"):format(name, table.concat(kv, " "))
      else
        parts[#parts + 1] = ("%s %s"):format(name, tostring(v))
      end
    end
    table.sort(parts)
    add("cache: %s", table.concat(parts, ", "))
  end
  local last = (type(py.last) == "table" and next(py.last)) and py.last or require("rwkv.suggest").state.last
  if last and next(last) then
    add("last request: %s reused, %s prefilled, %s decoded tokens; prefill %s ms, decode %s ms, total %s ms; %s candidates",
      tostring(last.reused_tokens), tostring(last.prefilled_tokens), tostring(last.decoded_tokens),
      tostring(last.ms_prefill), tostring(last.ms_decode), tostring(last.ms_total), tostring(last.candidates))
  else
    add("last request: none yet")
  end
  local s = require("rwkv.suggest").state
  add("session: %d requests, %d suggestions shown, %d accepted", s.requests, s.shown_count, s.accepted)
  if type(py.load) == "table" then
    add("engine: %s requests submitted, %s finished, %s superseded; at most %s computing at once",
      tostring(py.load.submitted), tostring(py.load.finished), tostring(py.load.superseded),
      tostring(py.load.max_running))
  end
  return lines
end

function M.show_status()
  M.ensure_setup()
  api.nvim_echo({ { table.concat(M.status_lines(), "\n") } }, true, {})
end

--- Download a model by short name or file name, in the background (:RwkvDownload NAME).
---@param name string
function M.download(name)
  name = vim.trim(name or "")
  if name == "" then
    notify("rwkv: :RwkvDownload needs a model name, e.g. :RwkvDownload g1-0.1b", vim.log.levels.ERROR)
    return
  end
  if remote.call("RwkvDownload", name) ~= nil then
    notify(("rwkv: downloading %s in the background …"):format(name))
  end
end

return M
