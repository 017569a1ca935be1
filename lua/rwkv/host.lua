-- rwkv.nvim: the only place that calls into Python (rplugin/python3/rwkv_nvim).
--
-- Two hosts, one code path: M.call(fname, ...) sends one of the functions of
-- rwkv_nvim/functions.py (the same table in both hosts) either
-- - "own": to the plugin's own Python host, `python -m rwkv_nvim.host` run from the
--   plugin's environment (:RwkvBuild) over an RPC channel (vim.rpcrequest for the sync
--   functions, vim.rpcnotify for the others). Started the first time it is needed (no
--   manifest, no :UpdateRemotePlugins, no restart); restarted once if it dies, with
--   RwkvStart re-sent with the last options;
-- - "manifest": to Neovim's shared python3 host through the rplugin manifest
--   (:UpdateRemotePlugins), as vim.fn[fname].
-- python.host = "auto" (default) takes the own host when the plugin's environment exists
-- (or python.env is set), else the manifest. The choice is made at the first call.
--
-- Every call is guarded: when no host can serve the plugin (no environment, not
-- registered, the host cannot start or died for good) the plugin degrades quietly: one
-- clear message, then nothing more while typing. :RwkvStatus shows the reason.
local M = {}

M.PLUGIN_DIR = "rwkv_nvim" -- rplugin/python3/<this>
M.FIX = "run :UpdateRemotePlugins, then restart Neovim"
M.BUILD_FIX = "run :RwkvBuild"
M.NOT_REGISTERED = "rwkv: the remote plugin is not registered: run :RwkvBuild (the plugin's own Python "
  .. "environment and host), or :UpdateRemotePlugins and restart Neovim."
-- the sync functions of rwkv_nvim/functions.py (answered; the others are notifications)
M.SYNC = { RwkvStatusInfo = true, RwkvPing = true }
M.MAX_RESTARTS = 1 -- own host: restarts after it died, per session (:RwkvEnable re-arms)

---@class rwkv.RemoteState
M.state = {
  started = false, -- RwkvStart sent (model loading or loaded)
  failed = nil, ---@type string|nil  why calls are off (not registered, host failed/died)
  kind = nil, ---@type "own"|"manifest"|nil  the host chosen at the first call
  why = nil, ---@type string|nil  why that host
  chan = nil, ---@type integer|nil  own host: its RPC channel (= job id)
  pid = nil, ---@type integer|nil
  ready = nil, ---@type table|nil  own host: {pid, python, executable, prefix} once it is up
  spawned_at = nil, ---@type number|nil  hrtime of the jobstart
  ready_ms = nil, ---@type number|nil  jobstart -> host attached, ms
  restarts = 0,
  exit = nil, ---@type string|nil  how the last own host ended
  stderr = {}, ---@type string[]  the own host's last stderr lines
  last_start = nil, ---@type table|nil  {engine_opts, host_opts} of the last RwkvStart
}

local function notify_once(msg, level)
  if M.state.failed then
    return
  end
  M.state.failed = msg
  vim.schedule(function()
    vim.notify(msg, level or vim.log.levels.WARN, { title = "rwkv" })
  end)
end

local function python_opts()
  return require("rwkv.config").current.python
end

--- The plugin's root directory (<root>/lua/rwkv/host.lua).
function M.plugin_root()
  return vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h:h")
end

--- The plugin's environment directory: python.env, else stdpath("data")/rwkv.nvim/venv.
function M.env_dir()
  local dir = python_opts().env or vim.fs.joinpath(vim.fn.stdpath("data"), "rwkv.nvim", "venv")
  return vim.fs.normalize(vim.fn.expand(dir))
end

--- The interpreter of the plugin's environment.
function M.env_python(dir)
  dir = dir or M.env_dir()
  if vim.fn.has("win32") == 1 then
    return vim.fs.joinpath(dir, "Scripts", "python.exe")
  end
  return vim.fs.joinpath(dir, "bin", "python")
end

--- Which host would serve the plugin now: "own" or "manifest", and why.
function M.choose()
  local py = python_opts()
  if py.host ~= "auto" then
    return py.host, ('python.host = "%s"'):format(py.host)
  end
  if py.env then
    return "own", "python.env is set"
  end
  if vim.fn.executable(M.env_python()) == 1 then
    return "own", "the plugin's environment exists"
  end
  return "manifest", "the plugin's environment does not exist (:RwkvBuild creates it)"
end

--- The host in use (chosen at the first call, then kept); see M.choose().
function M.kind()
  if not M.state.kind then
    M.state.kind, M.state.why = M.choose()
  end
  return M.state.kind, M.state.why
end

--- The informative end of a Vimscript error chain, one line, one sentence.
function M.one_line(err)
  local s = tostring(err):gsub("%s*\n.*", "")
  -- "FuncUndefined Autocommands for ...[10]..provider#Poll, line 17: <message>"
  s = s:match(".*line %d+: (.*)") or s
  s = s:gsub("^Vim:", ""):gsub("^Vim%(%a+%):", ""):gsub("^E5108: Error executing lua%s*", "")
  local sentence = (s:match("^(.-)%. ") or s):gsub("%.$", "")
  return sentence
end

-- -- the own host ----------------------------------------------------------------------

local function describe_exit(code)
  if code > 128 and code < 160 then -- Neovim reports a signal as 128 + its number
    return ("was killed (signal %d)"):format(code - 128)
  end
  return ("exited with code %d"):format(code)
end

--- The last stderr line worth showing ("" when none).
local function stderr_reason()
  for i = #M.state.stderr, 1, -1 do
    local line = vim.trim(M.state.stderr[i])
    if line ~= "" and not line:match("^%^+$") and not line:match("^File \"") then
      return line
    end
  end
  return ""
end

local spawn -- forward

local function on_exit(chan, code)
  local st = M.state
  if chan ~= st.chan then
    return -- a host stopped on purpose (M.stop)
  end
  local was_ready = st.ready ~= nil
  st.chan, st.pid, st.ready = nil, nil, nil
  st.exit = describe_exit(code)
  if st.failed or st.exiting or vim.v.exiting ~= vim.NIL then
    return
  end
  if not was_ready then -- it never came up: the environment is broken
    local reason = stderr_reason()
    notify_once(("rwkv: the plugin's Python host did not start (it %s%s): %s to repair %s (see :checkhealth rwkv)")
      :format(st.exit, reason ~= "" and (": " .. reason) or "", M.BUILD_FIX, M.env_dir()), vim.log.levels.ERROR)
    return
  end
  if not st.started then
    return -- nothing was running in it: the next call starts a new one
  end
  if st.restarts >= M.MAX_RESTARTS then
    notify_once(("rwkv: suggestions stopped: the Python host %s again (see :RwkvStatus; :RwkvEnable starts it again)")
      :format(st.exit), vim.log.levels.WARN)
    return
  end
  st.restarts = st.restarts + 1
  vim.notify(("rwkv: the Python host %s; restarted it"):format(st.exit), vim.log.levels.WARN, { title = "rwkv" })
  local new = spawn()
  if new and st.last_start then
    pcall(vim.rpcnotify, new, "RwkvStart", st.last_start[1], st.last_start[2])
  end
end

spawn = function()
  local st = M.state
  local dir = M.env_dir()
  local python = M.env_python(dir)
  if vim.fn.executable(python) ~= 1 then
    notify_once(("rwkv: the plugin's Python environment %s does not exist: %s to create it (see :checkhealth rwkv)")
      :format(dir, M.BUILD_FIX), vim.log.levels.ERROR)
    return nil
  end
  st.stderr = {}
  local partial = ""
  local ok, chan = pcall(vim.fn.jobstart, { python, "-m", "rwkv_nvim.host" }, {
    rpc = true,
    env = { PYTHONPATH = vim.fs.joinpath(M.plugin_root(), "rplugin", "python3") },
    on_stderr = function(_, data)
      if type(data) ~= "table" or #data == 0 then
        return
      end
      data[1] = partial .. data[1]
      partial = table.remove(data)
      vim.list_extend(st.stderr, data)
      while #st.stderr > 40 do
        table.remove(st.stderr, 1)
      end
    end,
    on_exit = function(id, code)
      if partial ~= "" then
        table.insert(st.stderr, partial)
        partial = ""
      end
      on_exit(id, code)
    end,
  })
  if not ok or type(chan) ~= "number" or chan <= 0 then
    notify_once(("rwkv: cannot start the plugin's Python host %s: %s; %s (see :checkhealth rwkv)"):format(python,
      ok and ("jobstart returned " .. tostring(chan)) or M.one_line(chan), M.BUILD_FIX), vim.log.levels.ERROR)
    return nil
  end
  st.chan, st.pid, st.ready, st.ready_ms = chan, vim.fn.jobpid(chan), nil, nil
  st.spawned_at = vim.uv.hrtime()
  if not st.leave_autocmd then
    st.leave_autocmd = vim.api.nvim_create_autocmd("VimLeavePre", {
      desc = "rwkv: no restart of the Python host while exiting",
      callback = function()
        st.exiting = true
      end,
    })
  end
  return chan
end

--- From host.py once it is attached: {pid, python, executable, prefix}.
function M.on_host_ready(info)
  M.state.ready = type(info) == "table" and info or {}
  if M.state.spawned_at then
    M.state.ready_ms = (vim.uv.hrtime() - M.state.spawned_at) / 1e6
  end
end

local function call_own(fname, ...)
  local chan = M.state.chan or spawn()
  if not chan then
    return nil
  end
  if M.SYNC[fname] then
    local ok, res = pcall(vim.rpcrequest, chan, fname, ...)
    return ok and res or nil -- not ok: the host is gone; its on_exit reports it
  end
  return pcall(vim.rpcnotify, chan, fname, ...) and 0 or nil
end

--- Stop the own host without a restart (the next call starts a new one).
function M.stop()
  local chan = M.state.chan
  M.state.chan, M.state.pid, M.state.ready = nil, nil, nil
  if chan then
    pcall(vim.fn.jobstop, chan)
  end
end

--- Forget the host and any failure: the next call chooses and starts a host afresh
--- (after :RwkvBuild, or :RwkvEnable after the own host died for good).
function M.reset()
  M.stop()
  local st = M.state
  st.started, st.failed, st.kind, st.why, st.restarts, st.exit = false, nil, nil, nil, 0, nil
end

-- -- the manifest host -----------------------------------------------------------------

--- Whether the manifest registered our python3 remote plugin (its functions exist).
function M.registered()
  if vim.fn.exists("*RwkvRequest") == 1 then
    return true
  end
  local ok, plugins = pcall(vim.fn["remote#host#PluginsForHost"], "python3")
  if not ok or type(plugins) ~= "table" then
    return false
  end
  for _, p in ipairs(plugins) do
    if type(p.path) == "string" and p.path:find(M.PLUGIN_DIR, 1, true) and #(p.specs or {}) > 0 then
      return true
    end
  end
  return false
end

--- Whether the host in use has been started (and is still alive).
---@return boolean running, string|nil why_not
function M.host_alive()
  if M.kind() == "own" then
    local chan = M.state.chan
    if not chan or vim.fn.jobwait({ chan }, 0)[1] ~= -1 then
      return false, M.state.exit and ("the Python host " .. M.state.exit) or "the Python host is not running"
    end
    return true
  end
  local ok, running = pcall(vim.fn["remote#host#IsRunning"], "python3")
  if not ok or running == 0 then
    return false, "the python3 host is not running"
  end
  local chan = vim.fn["remote#host#Require"]("python3")
  local status = vim.fn.jobwait({ chan }, 0)[1]
  if status ~= -1 then
    return false, ("the python3 host exited (code %d)"):format(status)
  end
  return true
end

local function call_manifest(fname, ...)
  if not M.registered() then
    notify_once(M.NOT_REGISTERED, vim.log.levels.WARN)
    return nil
  end
  if M.state.started then
    local alive, why = M.host_alive()
    if not alive then
      notify_once(("rwkv: suggestions stopped: %s (see :RwkvStatus, :checkhealth rwkv)"):format(why), vim.log.levels.WARN)
      return nil
    end
  end
  local ok, res = pcall(vim.fn[fname], ...)
  if not ok then
    local msg = M.one_line(res)
    if msg:find("E117", 1, true) or msg:find("Unknown function", 1, true) then
      notify_once(M.NOT_REGISTERED, vim.log.levels.WARN)
    else
      notify_once(("rwkv: the Python host failed: %s. Run :checkhealth rwkv."):format(msg), vim.log.levels.ERROR)
    end
    return nil
  end
  return res
end

-- -- the one code path -----------------------------------------------------------------

--- Call a remote function; nil on failure (after one message). `...` are its arguments.
---@param fname string
function M.call(fname, ...)
  if M.state.failed then
    return nil
  end
  if M.kind() == "own" then
    return call_own(fname, ...)
  end
  return call_manifest(fname, ...)
end

--- Start (or reconfigure) the engine with the user's engine options. Loads in the background.
---@param engine_opts table
function M.start(engine_opts)
  local host_opts = require("rwkv.config").host_opts()
  if M.call("RwkvStart", engine_opts, host_opts) == nil then
    return false
  end
  M.state.last_start = { engine_opts, host_opts }
  M.state.started = true
  return true
end

--- Engine status from Python ({} when the host is not started: never starts it).
function M.status()
  if not M.state.started or M.state.failed then
    return {}
  end
  local alive, why = M.host_alive()
  if not alive then
    if M.kind() == "manifest" then
      M.state.failed = M.state.failed or ("rwkv: " .. why)
    end
    return {}
  end
  local st = M.call("RwkvStatusInfo")
  return type(st) == "table" and st or {}
end

return M
