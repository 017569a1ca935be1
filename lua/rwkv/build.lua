-- rwkv.nvim: build the plugin's own Python environment (:RwkvBuild, lazy.nvim's build).
--
-- Runs `<python.interpreter> tools/quickstart.py env --venv <env> --no-nvim` (the quick
-- start's own logic, standard library only): a virtualenv under stdpath("data")/rwkv.nvim/venv
-- (or python.env), torch (python.torch_spec / $TORCH_SPEC, python.torch_index_url /
-- $TORCH_INDEX_URL), the plugin and its dependencies, and the compiled WKV-7 kernels
-- (`rwkv-nvim kernels`), so that the first suggestion does not wait for a compiler.
-- Its output is streamed line by line and kept in stdpath("log")/rwkv-build.log.
--
--   require("rwkv.build").run()   lazy.nvim: `build = function() require("rwkv.build").run() end`.
--       Inside a coroutine (lazy.nvim >= 11 runs build functions in one) every output line
--       is yielded as a progress message; otherwise it waits, echoing the steps. A failure
--       raises error("rwkv.nvim build failed: <reason> ..."), which lazy.nvim shows.
--   require("rwkv.build").command(bang)   :RwkvBuild (in the background, with notifications)
--       and :RwkvBuild! (waits).
local M = {}

M.last = nil ---@type {ok: boolean, seconds: number, message: string, log: string}|nil
M.running = false

local STEP = "^%[rwkv%.nvim%] "
M.WIDTH = 72 -- progress lines are cut to this many characters (lazy.nvim shows one, cut at its width)
M.HEARTBEAT_S = 5 -- a step silent this long is named again, with its time so far

--- The build's log file (the whole output of the last build).
function M.log_path()
  return vim.fs.joinpath(vim.fn.stdpath("log"), "rwkv-build.log")
end

--- What the build runs. Raises (one line) when the interpreter is missing.
---@param opts? {python?: table}  overrides of the python = {...} options
---@return {argv: string[], dir: string, interpreter: string}
function M.plan(opts)
  opts = opts or {}
  local remote = require("rwkv.host")
  local py = vim.tbl_extend("force", require("rwkv.config").current.python, opts.python or {})
  local interpreter = vim.fn.exepath(vim.fn.expand(py.interpreter))
  if interpreter == "" then
    error(("rwkv.nvim build failed: %s was not found (python.interpreter = %q): install Python 3.9 or newer "
      .. "(on Debian/Ubuntu: sudo apt install python3 python3-venv) or set python.interpreter to one")
      :format(py.interpreter, py.interpreter), 0)
  end
  local dir = vim.fs.normalize(vim.fn.expand(py.env or remote.env_dir()))
  local script = vim.fs.joinpath(remote.plugin_root(), "tools", "quickstart.py")
  local argv = { interpreter, "-u", script, "env", "--venv", dir, "--no-nvim" }
  if py.torch_spec then
    vim.list_extend(argv, { "--torch-spec", py.torch_spec })
  end
  if py.torch_index_url then
    vim.list_extend(argv, { "--torch-index-url", py.torch_index_url })
  end
  return { argv = argv, dir = dir, interpreter = interpreter }
end

--- Start the build process; returns the job: {lines, queue, done, code, signal, started, obj}.
--- `wake` is called (in a fast context) after new output and at the end.
local function start(plan, wake)
  local job = { lines = {}, queue = {}, done = false, started = vim.uv.hrtime() }
  local partial = { stdout = "", stderr = "" }
  local function push(line)
    line = line:gsub("%s+$", "")
    if line ~= "" then
      job.lines[#job.lines + 1] = line
      job.queue[#job.queue + 1] = line
    end
  end
  local function reader(name)
    return function(_, data)
      if data == nil then -- end of the stream
        push(partial[name])
        partial[name] = ""
      else
        local buf = partial[name] .. data:gsub("\r\n?", "\n")
        for line in buf:gmatch("([^\n]*)\n") do
          push(line)
        end
        partial[name] = buf:match("[^\n]*$")
      end
      wake()
    end
  end
  local ok, obj = pcall(vim.system, plan.argv, {
    text = true,
    env = { PYTHONUNBUFFERED = "1", PIP_PROGRESS_BAR = "off", PIP_NO_INPUT = "1" },
    stdout = reader("stdout"),
    stderr = reader("stderr"),
  }, function(res)
    job.code, job.signal, job.done = res.code, res.signal, true
    wake()
  end)
  if not ok then
    error(("rwkv.nvim build failed: cannot run %s: %s"):format(plan.interpreter, tostring(obj)), 0)
  end
  job.obj = obj
  return job
end

--- The outcome, once the job is done: ok, one-line message. Writes the build log.
--- The first capture of ``pattern`` in ``lines``, searched from the last line up.
local function last_match(lines, pattern)
  for i = #lines, 1, -1 do
    local got = lines[i]:match(pattern)
    if got then
      return got
    end
  end
end

local function finish(plan, job)
  local seconds = (vim.uv.hrtime() - job.started) / 1e9
  local log = M.log_path()
  vim.fn.mkdir(vim.fs.dirname(log), "p")
  pcall(vim.fn.writefile, vim.list_extend({ "$ " .. table.concat(plan.argv, " ") }, job.lines), log)
  local ok, msg = job.code == 0, nil
  if ok then
    -- "Python 3.11.7, torch 2.13.0+cpu" from the quick start's last line
    local detail = last_match(job.lines, "^%[rwkv%.nvim%] ready in .-%((.*)%)%s*$")
    msg = ("rwkv: the plugin's Python environment is ready (%sbuilt in %.0f s): %s"):format(
      detail and (detail .. ", ") or "", seconds, plan.dir)
  else
    local reason = last_match(job.lines, "^%[rwkv%.nvim%] error: (.*)")
    if not reason and (job.signal or 0) ~= 0 then
      reason = ("the build process was killed (signal %d)"):format(job.signal)
    end
    reason = reason or job.lines[#job.lines] or ("exit code " .. tostring(job.code))
    msg = ("rwkv.nvim build failed: %s (full output: %s)"):format(reason, log)
  end
  M.last = { ok = ok, seconds = seconds, message = msg, log = log }
  return ok, msg
end

--- doc/tags for :help rwkv: shipped with the plugin; made again when missing or older than
--- doc/rwkv.txt (a plugin manager that drops it, an edited doc). Returns whether it ran.
function M.help_tags()
  local doc = vim.fs.joinpath(require("rwkv.host").plugin_root(), "doc")
  local txt, tags = vim.uv.fs_stat(doc .. "/rwkv.txt"), vim.uv.fs_stat(doc .. "/tags")
  if not txt or (tags and tags.mtime.sec >= txt.mtime.sec) then
    return false
  end
  return (pcall(vim.cmd.helptags, vim.fn.fnameescape(doc)))
end

--- After a successful build: a host that failed or ran from the old environment is
--- forgotten, so the next call starts the own host from the new one.
local function after_success()
  M.help_tags()
  local remote = require("rwkv.host")
  if remote.state.kind == "own" or remote.state.failed then
    remote.reset()
  end
  vim.schedule(function() -- the model loads now, not at the next keystroke
    require("rwkv").preload()
  end)
end

--- lazy.nvim's running task (it runs build functions in its own coroutines), if any.
local function lazy_async()
  local mod = package.loaded["lazy.async"]
  if type(mod) == "table" and type(mod.running) == "function" then
    local ok, a = pcall(mod.running)
    if ok and type(a) == "table" and type(a.suspend) == "function" and type(a.resume) == "function" then
      return a
    end
  end
end

--- One output line as a short progress line: "rwkv: ..." for the build's own steps, cut
--- to M.WIDTH characters.
function M.short(line)
  line = line:gsub(STEP, "rwkv: ")
  if vim.fn.strchars(line) > M.WIDTH then
    line = vim.fn.strcharpart(line, 0, M.WIDTH - 1) .. "…"
  end
  return line
end

local function message(line)
  if line:find(STEP) then
    local err = line:find("^%[rwkv%.nvim%] error: ")
    return { msg = err and line or M.short(line), level = err and vim.log.levels.ERROR or vim.log.levels.INFO }
  end
  return M.short(line)
end

--- The step running now, said again after M.HEARTBEAT_S silent seconds: "rwkv: compiling
--- the WKV-7 kernels … (still running, 25 s)".
local function heartbeat(step, since)
  local s = ("%s (still running, %d s)"):format(step, math.floor((vim.uv.hrtime() - since) / 1e9))
  return { msg = M.short(s), level = vim.log.levels.INFO }
end

--- The build for plugin managers: see the top of this file. Returns true; raises on failure.
---@param opts? {python?: table}
function M.run(opts)
  local plan = M.plan(opts)
  local co, is_main = coroutine.running()
  local yieldable = co ~= nil and not is_main and coroutine.isyieldable()
  local async = yieldable and lazy_async() or nil
  local job
  job = start(plan, function()
    if async then
      vim.schedule(function()
        async:resume()
      end)
    end
  end)
  M.running = true
  local step, step_t, quiet_since = "rwkv: building", job.started, job.started
  local beat = async and vim.uv.new_timer() or nil
  if beat then -- lazy.nvim resumes us on output only: wake up for the heartbeat too
    beat:start(M.HEARTBEAT_S * 1000, M.HEARTBEAT_S * 1000, function()
      vim.schedule(function()
        if not job.done then
          async:resume()
        end
      end)
    end)
  end
  local function stop_beat()
    if beat and not beat:is_closing() then
      beat:stop()
      beat:close()
    end
  end
  local function yield(value)
    if coroutine.yield(value) == "abort" then -- lazy.nvim aborts its tasks this way
      job.obj:kill(15)
      stop_beat()
      M.running = false
      error("rwkv.nvim build aborted", 0)
    end
  end
  while true do
    while #job.queue > 0 do
      local line = table.remove(job.queue, 1)
      quiet_since = vim.uv.hrtime()
      if line:find(STEP) then
        step = M.short(line):gsub("%s*%(.*$", "") -- "rwkv: compiling the WKV-7 kernels"
        step_t = quiet_since
      end
      if yieldable then
        yield(message(line))
      elseif line:find(STEP) then
        vim.api.nvim_echo({ { line } }, true, {})
      end
    end
    if job.done then
      break
    end
    if yieldable and (vim.uv.hrtime() - quiet_since) / 1e9 >= M.HEARTBEAT_S then
      quiet_since = vim.uv.hrtime()
      yield(heartbeat(step, step_t))
    end
    if async then
      async:suspend() -- resumed by new output and by the end
    elseif yieldable then
      yield(nil)
    else
      vim.wait(200, function()
        return job.done or #job.queue > 0
      end)
    end
  end
  M.running = false
  stop_beat()
  local ok, msg = finish(plan, job)
  if not ok then
    error(msg, 0)
  end
  after_success()
  vim.api.nvim_echo({ { msg } }, true, {}) -- in :messages too: lazy.nvim's window drops the last line
  if yieldable then
    yield({ msg = msg, level = vim.log.levels.INFO })
  end
  return true
end

local function notify(msg, level)
  vim.notify(msg, level or vim.log.levels.INFO, { title = "rwkv" })
end

--- :RwkvBuild (in the background, each step notified) and :RwkvBuild! (waits).
---@param bang boolean|nil
function M.command(bang)
  if M.running then
    notify("rwkv: a build is already running", vim.log.levels.WARN)
    return
  end
  if bang then
    local ok, err = pcall(M.run)
    if not ok then
      notify(tostring(err), vim.log.levels.ERROR)
    end
    return
  end
  local ok, plan = pcall(M.plan)
  if not ok then
    notify(tostring(plan), vim.log.levels.ERROR)
    return
  end
  notify(("rwkv: building the plugin's Python environment in %s (about a minute or two) …"):format(plan.dir))
  local job
  local shown = 0
  job = start(plan, function()
    vim.schedule(function()
      for i = shown + 1, #job.lines do
        if job.lines[i]:find(STEP) and not job.lines[i]:find("^%[rwkv%.nvim%] error: ") then
          notify((job.lines[i]:gsub(STEP, "rwkv: ")))
        end
      end
      shown = #job.lines
      if job.done and M.running then
        M.running = false
        local good, msg = finish(plan, job)
        if good then
          after_success()
        end
        notify(msg, good and vim.log.levels.INFO or vim.log.levels.ERROR)
      end
    end)
  end)
  M.running = true
end

return M
