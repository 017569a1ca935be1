-- rwkv.nvim: extra context. Yanked text, the lines around the cursor when entering or
-- leaving a buffer and on :write become chunks of the engine's context ring; on idle
-- (CursorHold / CursorHoldI) the engine computes a queued chunk's state in the background.
-- Before the engine starts (first InsertEnter) chunks wait here, at most ring_queue.
local config = require("rwkv.config")
local remote = require("rwkv.host")

local api = vim.api
local M = {}

local MIN_LINES = 3 -- shorter chunks are noise
local RECENT = 64 -- remember this many chunk texts to skip duplicates

local queue = {} ---@type {text: string, filename: string}[]
local recent, recent_order = {}, {}

local function seen_before(text)
  if recent[text] then
    return true
  end
  recent[text] = true
  recent_order[#recent_order + 1] = text
  if #recent_order > RECENT then
    recent[table.remove(recent_order, 1)] = nil
  end
  return false
end

local function wanted(buf)
  return config.current.enabled and (config.current.engine.ring_n_chunks or 1) > 0 and config.buffer_allowed(buf)
end

--- At most ring_chunk_size of `lines`, each cut to max_line_bytes bytes.
---@param lines string[]
---@return string[]
function M.bounded(lines)
  local n = math.min(#lines, config.engine("ring_chunk_size"))
  local max = config.engine("max_line_bytes")
  local out = {}
  for i = 1, n do
    local line = lines[i]
    out[i] = #line > max and require("rwkv.suggest").clip_line(line, 0, max) or line
  end
  return out
end

--- Offer a chunk of text from `filename` as extra context.
---@param text string
---@param filename string
function M.push(text, filename)
  local _, newlines = text:gsub("\n", "")
  if newlines + 1 < MIN_LINES or text:match("^%s*$") or seen_before(text) then
    return false
  end
  if remote.state.started then
    remote.call("RwkvAddChunk", text, filename)
  else
    queue[#queue + 1] = { text = text, filename = filename }
    local limit = config.engine("ring_queue")
    while #queue > limit do
      table.remove(queue, 1)
    end
  end
  return true
end

--- Send the chunks queued before the engine started.
function M.flush()
  local q = queue
  queue = {}
  for _, c in ipairs(q) do
    remote.call("RwkvAddChunk", c.text, c.filename)
  end
end

--- Number of chunks waiting for the engine (tests, :RwkvStatus).
function M.pending()
  return #queue
end

--- ring_chunk_size lines centred on the cursor of the current window.
function M.around_cursor()
  local buf = api.nvim_get_current_buf()
  local n = config.engine("ring_chunk_size")
  local row = api.nvim_win_get_cursor(0)[1] - 1
  local count = api.nvim_buf_line_count(buf)
  local first = math.max(0, math.min(row - math.floor(n / 2), count - n))
  local lines = api.nvim_buf_get_lines(buf, first, math.min(count, first + n), false)
  return table.concat(M.bounded(lines), "\n")
end

local function chunk_current_buffer(ev)
  if ev.buf ~= api.nvim_get_current_buf() or not wanted(ev.buf) then
    return
  end
  M.push(M.around_cursor(), api.nvim_buf_get_name(ev.buf))
end

---@param opts {yank: boolean, buf_enter: boolean, save: boolean, prime_on_idle: boolean}
function M.setup(opts)
  local group = api.nvim_create_augroup("rwkv_context", { clear = true })
  if opts.yank then
    api.nvim_create_autocmd("TextYankPost", {
      group = group,
      desc = "rwkv: yanked text as context",
      callback = function(ev)
        local e = vim.v.event
        if e.operator == "y" and wanted(ev.buf) then
          M.push(table.concat(M.bounded(e.regcontents), "\n"), api.nvim_buf_get_name(ev.buf))
        end
      end,
    })
  end
  if opts.buf_enter then
    api.nvim_create_autocmd({ "BufEnter", "BufLeave" }, {
      group = group,
      desc = "rwkv: lines around the cursor as context",
      callback = chunk_current_buffer,
    })
  end
  if opts.save then
    api.nvim_create_autocmd("BufWritePost", {
      group = group,
      desc = "rwkv: saved lines as context",
      callback = chunk_current_buffer,
    })
  end
  if opts.prime_on_idle then
    api.nvim_create_autocmd({ "CursorHold", "CursorHoldI" }, {
      group = group,
      desc = "rwkv: compute queued context on idle",
      callback = function()
        if remote.state.started and config.current.enabled then
          remote.call("RwkvPrime")
        end
      end,
    })
  end
end

return M
