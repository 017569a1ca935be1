-- rwkv.nvim: local RWKV-7 code completion. Public Lua API:
--   require("rwkv").setup(opts)        validate and apply options (:help rwkv-options)
--   .enable() .disable() .toggle()     suggestions on / off
--   .status()                          {enabled, model, device, loaded, error, last_error, last = {...}}
--   .statusline()                      a short string for the statusline
-- The model loads in the Python host's worker thread: right after start-up with the
-- plugin's own host (M.preload), else on the first InsertEnter.
local config = require("rwkv.config")
local remote = require("rwkv.host")

local api = vim.api
local M = {}

local configured = false
local setup_error = nil ---@type string|nil  the last setup() failure: the plugin stays off

-- engine state as reported by Python's on_event callbacks
local engine = {
  loading = false,
  loaded = false,
  model = nil, ---@type string|nil
  device = nil, ---@type string|nil
  dtype = nil, ---@type string|nil
  precision = nil, ---@type string|nil  weights as run and why ("int8 (auto: decode ... ms vs ...)")
  load_ms = nil, ---@type number|nil
  error = nil, ---@type string|nil  why the engine is unusable (its start or load failed)
  last_error = nil, ---@type {message: string, time: integer}|nil  the newest failure of any kind
  warnings = {}, ---@type string[]  degraded but working (CPU fallback, no disk cache, ...)
}
-- errors already notified: each distinct message once (not once per keystroke); forgotten
-- when the engine loads again, so that a retry that fails the same way says so again
local notified_errors = {}
local notified_warnings = {} -- each warning once per session

local function notify(msg, level)
  vim.notify(msg, level or vim.log.levels.INFO, { title = "rwkv" })
end

--- Record an error as the last one (for :RwkvStatus) and notify it unless already notified.
local function report_error(msg)
  engine.last_error = { message = msg, time = os.time() }
  if not notified_errors[msg] then
    notified_errors[msg] = true
    notify("rwkv: " .. msg, vim.log.levels.ERROR)
  end
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
  au({ "BufLeave", "WinLeave", "CompleteChanged" }, suggest.hide, "hide the suggestion")
end

--- Validate and apply options. Returns false (after one error message) on a bad option.
---@param opts table|nil
function M.setup(opts)
  local ok, err = pcall(config.apply, opts)
  if not ok then
    setup_error = tostring(err)
    notify(setup_error, vim.log.levels.ERROR)
    return false
  end
  configured, setup_error = true, nil
  define_highlights()
  create_autocmds()
  require("rwkv.keymaps").setup(config.current.keymaps)
  require("rwkv.context").setup(config.current.context)
  if config.current.lsp.enabled or package.loaded["rwkv.lsp"] then
    require("rwkv.lsp").setup(config.current.lsp) -- the in-process language server (on or off)
  end
  if remote.state.started then
    remote.start(config.engine_opts()) -- new engine options take effect now
  else
    M.schedule_preload()
  end
  return true
end

--- At plugin start (after VimEnter, deferred): start the engine, so that the model loads
--- in the Python host's worker while the user reads, not at the first keystroke. Only
--- with the plugin's own host (its environment exists): starting it is a jobstart and
--- one notification, nothing blocks the editor (Neovim's shared python3 host would block
--- while it starts: that one still starts on the first InsertEnter).
function M.preload()
  if not configured or not config.current.enabled or remote.state.started or remote.state.failed then
    return false
  end
  if package.loaded["rwkv.build"] and require("rwkv.build").running then
    return false -- its environment is being built (python exists before pynvim does)
  end
  local kind = remote.state.kind or remote.choose()
  if kind ~= "own" or vim.fn.executable(remote.env_python(remote.env_dir())) ~= 1 then
    return false
  end
  if not config.buffer_allowed(api.nvim_get_current_buf()) then
    return false
  end
  M.start_engine()
  return remote.state.started
end

function M.schedule_preload()
  local function later()
    vim.defer_fn(M.preload, M.PRELOAD_DELAY_MS)
  end
  if vim.v.vim_did_enter == 1 then
    later()
  else
    api.nvim_create_autocmd("VimEnter", { once = true, callback = later, desc = "rwkv: load the model at start" })
  end
end
M.PRELOAD_DELAY_MS = 100

--- setup() with defaults unless the user already called it (plugin/rwkv.lua). After a
--- failed setup() nothing starts with defaults: the user's options were wrong, not absent.
function M.ensure_setup()
  if not configured and not setup_error then
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
    -- a new engine (first start, new options or a retry): the old one is gone
    engine.loading, engine.loaded, engine.error, engine.model = true, false, nil, info.model or engine.model
    engine.precision = nil
    notified_errors = {}
    if not quiet then
      if (config.current.engine.backend or "local") ~= "local" then
        notify(("rwkv: connecting to the %s …"):format(info.model or "server"))
      else
        notify(("rwkv: loading model %s …"):format(info.model or "(default)"))
      end
    end
  elseif kind == "ready" then
    engine.loading, engine.loaded = false, true
    engine.model, engine.device, engine.dtype, engine.load_ms = info.model, info.device, info.dtype, info.load_ms
    engine.precision = info.precision
    if not quiet then
      if info.device == "remote" then -- the engine says "ready" once the server answered
        notify(("rwkv: %s answered: ready"):format(info.model or "the server"))
      else
        notify(("rwkv: %s ready on %s (%d ms)"):format(info.model or "model", info.device or "?",
          math.floor(tonumber(info.load_ms) or 0)))
      end
    end
  elseif kind == "progress" then
    if not quiet and info.message then
      notify("rwkv: " .. info.message)
    end
  elseif kind == "error" then
    local msg = info.message or "unknown error"
    if not engine.loaded then -- the start or the load failed: suggestions are off
      engine.loading = false
      engine.error = msg
    end -- else one request failed: the engine still works
    report_error(msg)
  elseif kind == "warning" then
    local msg = info.message or "unknown problem"
    if not notified_warnings[msg] then -- each warning once per session
      notified_warnings[msg] = true
      engine.warnings[#engine.warnings + 1] = msg
      notify("rwkv: " .. msg, vim.log.levels.WARN)
    end
  elseif kind == "download" then
    notify("rwkv: " .. (info.message or ""), info.ok and vim.log.levels.INFO or vim.log.levels.ERROR)
  end
end

--- From suggest.on_done: the error of a finished request (a malformed request, an engine
--- failure also sent as an "error" event, or the model that did not load). Kept for
--- :RwkvStatus; notified once per distinct message.
---@param msg string
function M.on_request_error(msg)
  report_error(msg)
end

function M.is_enabled()
  return config.current.enabled
end

function M.enable()
  M.ensure_setup()
  config.current.enabled = true
  if remote.state.failed and remote.state.kind == "own" then
    remote.reset() -- the own host died for good or did not start: try again on the next InsertEnter
  end
  -- the model failed to load (e.g. not downloaded yet): load it again; the host starts a
  -- new engine for the same options only when the last load failed
  if engine.error and not engine.loaded and not engine.loading and remote.state.started
      and not remote.state.failed then
    engine.loading = true
    if not remote.start(config.engine_opts()) then
      engine.loading = false
    end
  end
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
    last_error = engine.last_error and vim.deepcopy(engine.last_error) or nil,
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

--- "14:03:12, 2 min ago" for an epoch time in seconds.
local function fmt_when(t)
  local ago = math.max(0, os.time() - math.floor(t))
  local rel
  if ago < 60 then
    rel = ("%d s ago"):format(ago)
  elseif ago < 3600 then
    rel = ("%d min ago"):format(math.floor(ago / 60))
  else
    rel = ("%.1f h ago"):format(ago / 3600)
  end
  return ("%s, %s"):format(os.date("%H:%M:%S", math.floor(t)), rel)
end

--- The newer of two {message, time} records (either may be nil or vim.NIL).
local function newer_error(a, b)
  local function ok(e)
    return type(e) == "table" and type(e.message) == "string" and type(e.time) == "number"
  end
  a, b = ok(a) and a or nil, ok(b) and b or nil
  if a and b then
    return (b.time > a.time) and b or a
  end
  return a or b
end

local function fmt_bytes(n)
  if type(n) ~= "number" then
    return tostring(n)
  end
  return ("%.1f MB"):format(n / 1048576)
end

--- The ":RwkvStatus" line about the Python host: which one, its process, its memory.
---@param py table  the host's status (pid, rss_bytes) or {}
local function host_line(py)
  local kind, why = remote.state.kind, remote.state.why
  if not kind then
    kind, why = remote.choose()
  end
  local st = remote.state
  local parts = {}
  if kind == "own" then
    parts[1] = ("own (%s), environment %s"):format(why, remote.env_dir())
    if st.ready and st.ready.python then
      parts[#parts + 1] = "Python " .. tostring(st.ready.python)
    end
  else
    parts[1] = ("Neovim's python3 host via the rplugin manifest (%s)"):format(why)
  end
  local pid = py.pid or st.pid
  if pid then
    parts[#parts + 1] = ("pid %s"):format(tostring(pid))
  end
  if type(py.rss_bytes) == "number" then
    parts[#parts + 1] = ("%s resident"):format(fmt_bytes(py.rss_bytes))
  end
  if st.ready_ms then
    parts[#parts + 1] = ("started in %d ms"):format(math.floor(st.ready_ms))
  end
  if st.restarts > 0 then
    parts[#parts + 1] = ("restarted %d time%s (it %s)"):format(st.restarts, st.restarts == 1 and "" or "s",
      tostring(st.exit))
  end
  return "host: " .. table.concat(parts, ", ")
end

--- Lines for :RwkvStatus (asks Python when the host runs).
function M.status_lines()
  local st = M.status()
  local py = remote.status()
  local lines = {}
  local function add(fmt, ...)
    lines[#lines + 1] = fmt:format(...)
  end
  if setup_error then
    add("rwkv: off: setup() failed: %s", setup_error)
    return lines
  end
  add("rwkv: suggestions %s", st.enabled and "enabled" or "disabled")
  lines[#lines + 1] = host_line(py)
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
  local is_remote = (config.current.engine.backend or "local") ~= "local"
  local state
  if is_remote then -- "ready" only once the server answered (the engine says so)
    state = loaded and "the server answered" or (st.loading and "connecting" or "no answer from the server yet")
  else
    state = loaded and "loaded" or (st.loading and "loading" or "not loaded")
  end
  add("model: %s  device: %s  %s", model, is_remote and "remote" or where, state)
  if not is_remote then
    local precision = M.precision_text(py.precision or engine.precision, py.dtype or engine.dtype)
    if precision then
      add("precision: %s", precision)
    end
    if type(py.cpu_kernels) == "string" and py.cpu_kernels ~= "" then
      add("cpu kernels: %s", py.cpu_kernels) -- the instruction-set path in use ("q8: avx2")
    end
  end
  local err = py.error or st.error
  local last_err = newer_error(engine.last_error, py.last_error)
  if err and err ~= vim.NIL and err ~= remote.state.failed then
    if last_err and last_err.message == err then
      add("error (%s): %s", fmt_when(last_err.time), err)
      last_err = nil
    else
      add("error: %s", err)
    end
  end
  if last_err then
    add("last error (%s): %s", fmt_when(last_err.time), last_err.message)
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
  local last, what, on_screen = M.request_stats(py)
  if last and next(last) then
    add("%s: %s reused, %s prefilled, %s decoded tokens; prefill %s ms, decode %s ms, total %s ms; %s candidates%s",
      what, tostring(last.reused_tokens), tostring(last.prefilled_tokens), tostring(last.decoded_tokens),
      tostring(last.ms_prefill), tostring(last.ms_decode), tostring(last.ms_total), tostring(last.candidates),
      on_screen and (", %d on screen"):format(on_screen) or "")
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
  local out = {}
  for _, line in ipairs(M.status_lines()) do
    vim.list_extend(out, M.wrap(line, vim.o.columns - 1))
  end
  api.nvim_echo({ { table.concat(out, "\n") } }, true, {})
end

--- `line` cut into lines of at most `width` display cells: between its items (after ", ",
--- "; " or two spaces) where it can, else between words (a word longer than the width
--- stands alone); the continuation lines are indented by two spaces.
---@param line string
---@param width integer
---@return string[]
function M.wrap(line, width)
  width = math.max(20, width)
  local dw = vim.fn.strdisplaywidth
  if dw(line) <= width then
    return { line }
  end
  local pieces = {} -- items, each with the separator that ends it
  local rest = line
  while rest ~= "" do
    local _, e = rest:find("[,;] +") -- the first ", " / "; " ...
    local a2, e2 = rest:find("%S  +") -- ... or two spaces
    if a2 and (not e or a2 < e) then
      e = e2
    end
    pieces[#pieces + 1] = rest:sub(1, e or #rest)
    rest = e and rest:sub(e + 1) or ""
  end
  local out, cur = {}, ""
  local function push(text) -- add `text` (one item or word) to the line being built
    local joined = cur .. text
    if cur ~= "" and cur ~= "  " and dw(vim.trim(joined)) > width - (#out > 0 and 2 or 0) then
      out[#out + 1] = vim.trim(cur)
      cur = "  " .. text
    else
      cur = joined
    end
  end
  for _, piece in ipairs(pieces) do
    if dw(vim.trim(piece)) > width - 2 then
      for word in piece:gmatch("%S+%s*") do
        push(word)
      end
    else
      push(piece)
    end
  end
  out[#out + 1] = vim.trim(cur)
  for i = 2, #out do
    out[i] = "  " .. out[i]
  end
  return out
end

--- The precision line: the weights' format and why, and the activations' dtype when it
--- differs (int8 weights compute with float32 activations). nil when nothing is known.
---@param precision string|nil  "int8 (auto: ...)", "fp32 (engine.dtype)"
---@param dtype string|nil      the model's compute dtype: "float32", "bfloat16"
function M.precision_text(precision, dtype)
  local names = { float32 = "fp32", float16 = "fp16", bfloat16 = "bf16" }
  precision = type(precision) == "string" and precision ~= "" and precision or nil
  dtype = type(dtype) == "string" and dtype ~= "" and dtype ~= "n/a" and dtype or nil
  if not precision then
    return dtype and ("%s weights"):format(names[dtype] or dtype) or nil
  end
  local mode = precision:match("^(%S+)")
  if dtype and (names[dtype] or dtype) ~= mode then
    return ("%s; activations in %s"):format(precision, names[dtype] or dtype)
  end
  return precision
end

--- The stats :RwkvStatus shows: those of the request whose candidates are on screen, else
--- of the last finished one. Returns stats, its label, the number of candidates shown.
---@param py table  the host's status
function M.request_stats(py)
  local s = require("rwkv.suggest").state
  local shown = s.shown
  if shown and shown.done and s.stats[shown.id] then
    return s.stats[shown.id], ("shown request (#%d)"):format(shown.id), #shown.items
  end
  local last = s.last
  if not (last and next(last)) and type(py.last) == "table" and next(py.last) then
    last = py.last -- this editor has not seen a result yet (a restarted Neovim, another view)
  end
  return last, "last request", nil
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
