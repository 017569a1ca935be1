-- :checkhealth rwkv. One python3 call probes the host interpreter
-- (`python -m rwkv_engine.cli.health host`, run in the plugin's root so this checkout's
-- package is found installed or not; it finds packages without importing torch, so the
-- check stays fast).
local M = {}

local h = vim.health


--- The python3 interpreter Neovim uses for remote plugins (nil, reason when none).
function M.host_python()
  local prog = vim.g.python3_host_prog
  if type(prog) == "string" and prog ~= "" then
    prog = vim.fn.expand(prog)
    if vim.fn.executable(prog) == 1 then
      return prog
    end
    return nil, ("g:python3_host_prog = %s is not executable"):format(prog)
  end
  if vim.g.loaded_python3_provider == 0 then
    return nil, "the python3 provider is off (g:loaded_python3_provider = 0: disabled, or no Python with pynvim found)"
  end
  local ok, detected = pcall(function()
    return vim.provider.python.detect_by_module("neovim")
  end)
  if ok and type(detected) == "string" and detected ~= "" then
    return detected
  end
  for _, name in ipairs({ "python3", "python" }) do
    if vim.fn.executable(name) == 1 then
      return vim.fn.exepath(name)
    end
  end
  return nil, "no python3 found: set g:python3_host_prog to a Python with pynvim"
end

--- Run one of the engine's health probes (rwkv_engine/cli/health.py) in `python`, in the
--- plugin's root; returns the decoded table or nil, error (its last line of stderr).
function M.run_probe(python, args, timeout_ms)
  local cmd = { python, "-m", "rwkv_engine.cli.health" }
  vim.list_extend(cmd, args)
  local ok, res = pcall(function()
    return vim.system(cmd, { text = true, cwd = require("rwkv.host").plugin_root() }):wait(timeout_ms or 30000)
  end)
  if not ok then
    return nil, tostring(res)
  end
  if res.code ~= 0 then
    local err = vim.trim(res.stderr or "")
    err = err:match("([^\n]*)$") or err
    return nil, err ~= "" and err or ("python exited with " .. tostring(res.code))
  end
  local last = vim.trim(res.stdout or ""):match("([^\n]*)$") or ""
  local decoded_ok, info = pcall(vim.json.decode, last)
  if not decoded_ok or type(info) ~= "table" then
    return nil, "unexpected probe output: " .. last
  end
  return info
end

function M.probe(python, model, download_dir)
  return M.run_probe(python, { "host", model or "", download_dir or "" })
end

function M.check()
  local config = require("rwkv.config")
  local remote = require("rwkv.host")
  local c = config.current

  h.start("rwkv: Neovim")
  if vim.fn.has("nvim-0.10") == 1 then
    h.ok(("Neovim %s (inline virtual text available)"):format(tostring(vim.version())))
  else
    h.error("Neovim 0.10 or newer is needed (inline virtual text)")
  end
  h.info(("suggestions %s; filetypes off: %s"):format(c.enabled and "enabled" or "disabled",
    table.concat(vim.tbl_filter(function(ft)
      return c.filetypes[ft] == false
    end, vim.tbl_keys(c.filetypes)), ", ")))

  h.start("rwkv: Python environment and host")
  local kind, why = remote.state.kind, remote.state.why
  if not kind then
    kind, why = remote.choose()
  end
  local python, fix
  if kind == "own" then
    local dir = remote.env_dir()
    python = remote.env_python(dir)
    h.ok(("the plugin's own host (`python -m rwkv_nvim.host`), because %s"):format(why))
    fix = { "run :RwkvBuild to create or repair it (log: " .. require("rwkv.build").log_path() .. ")" }
    if vim.fn.executable(python) ~= 1 then
      h.error(("the plugin's environment %s does not exist (no %s)"):format(dir, python), vim.list_extend(vim.deepcopy(fix),
        { 'or set python = { host = "manifest" } in setup() to use Neovim\'s python3 host' }))
      return
    end
    h.ok("environment: " .. dir)
  else
    h.ok(("Neovim's python3 host through the rplugin manifest, because %s"):format(why))
    h.info(":RwkvBuild creates the plugin's own environment and host instead (no :UpdateRemotePlugins, no restart)")
    local why_not
    python, why_not = M.host_python()
    if not python then
      h.error(why_not, { "install pynvim into a Python 3 and set g:python3_host_prog to it", "or run :RwkvBuild" })
      return
    end
    h.ok(("python3 host: %s%s"):format(python, vim.g.python3_host_prog and " (g:python3_host_prog)" or " (detected)"))
  end
  local function advice(cmd)
    return fix or { python .. " -m pip install " .. cmd }
  end
  local info, err = M.probe(python, c.engine.model, c.engine.download_dir)
  if not info then
    h.error("could not run " .. python .. ": " .. tostring(err), fix)
    return
  end
  h.info(("Python %s (%s)"):format(tostring(info.python), tostring(info.executable)))
  if info.pynvim then
    h.ok("pynvim " .. tostring(info.pynvim_version or "(version unknown)"))
  else
    h.error("pynvim is not installed in " .. python, advice("pynvim"))
  end
  if info.rwkv_engine_installed then
    h.ok("rwkv_engine importable")
  else
    h.ok("rwkv_engine is not installed; the plugin's own " .. tostring(info.engine_dir) .. " is used")
  end
  if info.torch then
    h.ok("torch " .. tostring(info.torch_version or "(version unknown)"))
    if c.engine.device == "mps" then
      if info.apple_silicon then
        h.ok("engine.device = \"mps\": the Apple GPU through torch's MPS backend (not yet verified on a Mac)")
      else
        h.warn("engine.device = \"mps\" needs an Apple Silicon Mac: the model runs on the CPU",
          { "use device = \"auto\" (CUDA/ROCm when present, else the CPU)" })
      end
    end
    if info.torch_cuda and info.torch_cuda ~= vim.NIL then
      h.ok(("torch built with CUDA %s%s"):format(info.torch_cuda, info.nvidia_device and "; an NVIDIA device is present" or "; no NVIDIA device found"))
    elseif info.torch_hip and info.torch_hip ~= vim.NIL then
      h.ok(("torch built with ROCm/HIP %s%s"):format(info.torch_hip, info.rocm_device and "; /dev/kfd present" or "; no ROCm device found"))
    else
      h.info("torch is CPU-only: the model runs on the CPU")
      if c.engine.device == "cuda" then
        h.warn("engine.device = \"cuda\" but this torch has no CUDA support", { "use device = \"auto\" or install a CUDA build of torch" .. (fix and " (python.torch_index_url, then :RwkvBuild)" or "") })
      elseif info.nvidia_device or info.rocm_device then
        h.info("a GPU is present: a CUDA/ROCm torch would use it (python.torch_index_url or $TORCH_INDEX_URL, see :help rwkv-gpu)")
      end
    end
    if #(info.kernels or {}) > 0 then
      h.ok(("compiled WKV-7 kernels: %s (in %s)"):format(table.concat(info.kernels, ", "), tostring(info.kernel_root)))
    else
      h.info(("no compiled WKV-7 kernel in %s yet: the first suggestion compiles it (about 10 s); %s compiles it ahead")
        :format(tostring(info.kernel_root), kind == "own" and ":RwkvBuild" or "`rwkv-nvim kernels`"))
    end
  else
    h.error("torch is not installed in " .. (kind == "own" and ("the plugin's environment " .. remote.env_dir()) or python), advice("torch"))
  end
  if info.huggingface_hub then
    h.ok("huggingface_hub installed (:RwkvDownload)")
  else
    h.warn("huggingface_hub is missing: :RwkvDownload will not work", advice("huggingface_hub"))
  end

  require("rwkv.health_server").check(h, { python = python, engine = c.engine })

  h.start("rwkv: model")
  local st = require("rwkv").status()
  local backend = c.engine.backend or "local"
  if backend ~= "local" then
    -- the server's model answers: nothing loads here, and "ready" means the server answered
    h.info(("no local model: the %s server's model answers (engine.backend = %q)"):format(backend, backend))
    if st.loaded then
      h.ok("the server answered: suggestions come from it")
    elseif st.loading then
      h.info("connecting to the server …")
    elseif not st.error then
      h.info("not connected yet (the engine starts on the first InsertEnter)")
    end
  end
  local model = c.engine.model or "(the shipped default model)"
  if backend ~= "local" then
    -- reported above
  elseif info.model_found then
    h.ok(("model %s: %s"):format(model, tostring(info.model_path)))
  elseif info.engine_dir then
    local advice = { "set engine.model to a checkpoint path, or download one: :RwkvDownload g1-0.1b" }
    h.error(("model %s not found%s"):format(model,
      (info.model_path and info.model_path ~= vim.NIL) and (" at " .. info.model_path) or ""), advice)
  end
  if backend ~= "local" then
    -- reported above
  elseif st.loaded then
    local py = require("rwkv.host").status()
    local isa = type(py.cpu_kernels) == "string" and py.cpu_kernels ~= "" and ("; CPU kernels " .. py.cpu_kernels) or ""
    h.ok(("loaded on %s%s"):format(tostring(st.device), isa))
  elseif st.loading then
    h.info("loading …")
  elseif not st.error then
    h.info("not loaded yet (it loads on the first InsertEnter)")
  end

  if kind == "own" then
    h.start("rwkv: own Python host")
    if remote.state.chan then
      h.ok(("running: pid %s%s"):format(tostring(remote.state.pid),
        remote.state.ready_ms and (", started in %d ms"):format(math.floor(remote.state.ready_ms)) or ""))
    elseif not remote.state.failed then
      h.info("not started yet (it starts on the first InsertEnter)")
    end
    if remote.state.restarts > 0 then
      h.warn(("restarted %d time(s): it %s"):format(remote.state.restarts, tostring(remote.state.exit)))
    end
    if remote.state.failed then
      h.error(remote.state.failed, { "run :RwkvBuild if the environment is broken, then :RwkvEnable",
        "the host's last error output: " .. (remote.state.stderr[#remote.state.stderr] or "(none)") })
    end
  else
    h.start("rwkv: remote plugin")
    if remote.registered() then
      h.ok("remote plugin rwkv_nvim is registered")
    else
      h.error("remote plugin rwkv_nvim is not registered (its functions are unknown to Neovim)",
        { "run :UpdateRemotePlugins, then restart Neovim", "or run :RwkvBuild: the plugin's own host needs no registration",
          "the manifest is " .. tostring(vim.g.loaded_remote_plugins) })
    end
    if remote.state.failed then
      h.error(remote.state.failed)
    elseif remote.state.started then
      local alive, why_not = remote.host_alive()
      if alive then
        h.ok("the python3 host is running")
      else
        h.error(why_not or "the python3 host is not running")
      end
    end
  end
  if st.error and not remote.state.failed then
    h.error("engine: " .. tostring(st.error), fix)
  end
  M.check_lsp(h)
end

--- The in-process language server (completion menus): on/off, running, attached buffers.
function M.check_lsp(h)
  h.start("rwkv: language server (completion menus)")
  local cfg = require("rwkv.config").current
  if not (cfg.lsp and cfg.lsp.enabled) then
    h.info("off (lsp = { enabled = true } shows the candidates in blink.cmp, nvim-cmp and "
      .. "Neovim's own completion menu; :help rwkv-lsp)")
    return
  end
  local id = package.loaded["rwkv.lsp"] and require("rwkv.lsp").client_id()
  if not id then
    h.warn("enabled, not running yet (it starts in the first buffer where suggestions are allowed)",
      { "open a buffer whose filetype is allowed (filetypes option), or check :RwkvStatus" })
    return
  end
  local bufs = vim.lsp.get_buffers_by_client_id and vim.lsp.get_buffers_by_client_id(id) or {}
  h.ok(("running in-process as client %d (%s), attached to %d buffer(s)"):format(
    id, require("rwkv.lsp").NAME, #bufs))
end

return M
