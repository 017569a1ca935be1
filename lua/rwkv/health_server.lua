-- :checkhealth rwkv, the backend part: which backend runs and, for a remote one
-- (engine.backend = "llama.cpp" | "openai"), whether its server answers and with what
-- model. The server is reached by the engine's own code
-- (rwkv_engine.pipeline.remote_backend.probe, through rwkv_engine/cli/health.py) in a
-- one-shot python3 process with short timeouts, so the check says exactly what the plugin
-- would meet.
local M = {}

local function present(v)
  return v ~= nil and v ~= vim.NIL
end

--- Run the probe (`python -m rwkv_engine.cli.health server`); returns its table or nil, error.
function M.probe(python, engine, timeout_ms)
  local ok, payload = pcall(vim.json.encode, engine or {})
  if not ok then
    return nil, "engine options cannot be encoded: " .. tostring(payload)
  end
  return require("rwkv.health").run_probe(python, { "server", payload }, timeout_ms or 20000)
end

--- Report the backend. `h`: vim.health (or a table with start/ok/info/warn/error);
--- opts: { python = the host's python3 (required for a remote backend),
---         engine = the engine options (default: require("rwkv.config").current.engine),
---         timeout_ms = how long the probe may take in all (default 20000) }.
function M.check(h, opts)
  opts = opts or {}
  local engine = opts.engine
  if engine == nil then
    engine = require("rwkv.config").current.engine or {}
  end
  local backend = engine.backend
  if not present(backend) then
    backend = "local"
  end
  h.start("rwkv: backend")
  if backend == "local" then
    h.ok('local: the model runs in the Python host (engine.backend = "local")')
    return
  end
  local url = present(engine.url) and tostring(engine.url) or "(no url)"
  h.info(('engine.backend = "%s", engine.url = "%s": suggestions come from that server'):format(backend, url))
  if not opts.python then
    h.error("no python3 host to reach the server from", { "set g:python3_host_prog to a Python with pynvim" })
    return
  end
  local info, err = M.probe(opts.python, engine, opts.timeout_ms)
  if not info then
    h.error("could not run the server check in " .. opts.python .. ": " .. tostring(err))
    return
  end
  if present(info.api_key) then
    if tostring(info.api_key):find("not set", 1, true) then
      h.error("API key: " .. info.api_key, { "export the variable before starting Neovim" })
    else
      h.ok("API key " .. info.api_key)
    end
  end
  if not info.ok then
    local advice = { "check engine.url and that the server runs" }
    if backend == "llama.cpp" then
      table.insert(advice, "an RWKV-7 model: rwkv-nvim export-gguf model.pth model.gguf; "
        .. "llama-server -m model.gguf -np 4 --port 8080 (see :help rwkv-remote)")
    end
    h.error(tostring(info.error or "the server did not answer"), advice)
    return
  end
  local label = ("%s server %s"):format(backend, present(info.url) and info.url or url)
  h.ok(("%s answers (%s ms)"):format(label, tostring(info.ms or "?")))
  local prompt = ({
    rwkv = "the RWKV fill-in-the-middle prompt" .. (info.ids and " as token ids" or " as text"),
    infill = "the server's fill-in-the-middle (" .. (backend == "llama.cpp" and "/infill" or "suffix") .. ")",
    plain = "the text before the cursor only",
  })[info.fim] or tostring(info.fim)
  h.info(("model: %s; prompt: %s%s"):format(tostring(info.model or "?"), prompt,
    present(info.slots) and ("; %s slots (candidates at once)"):format(tostring(info.slots)) or ""))
  -- token healing needs a constraint on the first generated tokens, which these servers
  -- do not offer: the prompt keeps every token up to the cursor
  h.info("token healing: off with a server (the prompt ends at the cursor as typed; "
    .. "the local engine heals the word at the cursor)")
  if backend == "llama.cpp" and present(info.slots) and tonumber(info.slots) and tonumber(info.slots) < 2 then
    h.warn("the server has 1 slot: one candidate per request", { "start llama-server with -np 4" })
  end
end

return M
