-- rwkv.nvim: the only place that calls into the Python remote plugin (rplugin/python3/rwkv_nvim).
--
-- Every call is guarded: when the remote plugin is not registered (no :UpdateRemotePlugins)
-- or the Python host cannot start or has died, the plugin degrades quietly: one clear
-- message, then nothing more while typing. :RwkvStatus shows the reason.
local M = {}

M.PLUGIN_DIR = "rwkv_nvim" -- rplugin/python3/<this>
M.FIX = "run :UpdateRemotePlugins, then restart Neovim"

---@class rwkv.RemoteState
M.state = {
  started = false, -- RwkvStart sent (model loading or loaded)
  failed = nil, ---@type string|nil  why calls are off (not registered, host failed/died)
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

--- Whether the shared python3 host process has been started (and is still alive).
---@return boolean running, string|nil why_not
function M.host_alive()
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

--- The informative end of a Vimscript error chain, one line, one sentence.
function M.one_line(err)
  local s = tostring(err):gsub("%s*\n.*", "")
  -- "FuncUndefined Autocommands for ...[10]..provider#Poll, line 17: <message>"
  s = s:match(".*line %d+: (.*)") or s
  s = s:gsub("^Vim:", ""):gsub("^Vim%(%a+%):", ""):gsub("^E5108: Error executing lua%s*", "")
  local sentence = (s:match("^(.-)%. ") or s):gsub("%.$", "")
  return sentence
end

--- Call a remote function; nil on failure (after one message). `...` are its arguments.
---@param fname string
function M.call(fname, ...)
  if M.state.failed then
    return nil
  end
  if not M.registered() then
    notify_once("rwkv: the remote plugin is not registered: " .. M.FIX .. ".", vim.log.levels.WARN)
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
      notify_once("rwkv: the remote plugin is not registered: " .. M.FIX .. ".", vim.log.levels.WARN)
    else
      notify_once(("rwkv: the Python host failed: %s. Run :checkhealth rwkv."):format(msg), vim.log.levels.ERROR)
    end
    return nil
  end
  return res
end

--- Start (or reconfigure) the engine with the user's engine options. Loads in the background.
---@param engine_opts table
function M.start(engine_opts)
  if M.call("RwkvStart", engine_opts, require("rwkv.config").host_opts()) == nil then
    return false
  end
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
    M.state.failed = M.state.failed or ("rwkv: " .. why)
    return {}
  end
  return M.call("RwkvStatusInfo") or {}
end

return M
