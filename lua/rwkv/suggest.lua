-- rwkv.nvim: the suggestion state machine.
--
-- Typing (debounced) -> request {buf, changedtick, cursor, window of lines} to Python ->
-- streamed partial text (ghost only) -> final candidates (ghost + float). A result is
-- drawn only while the buffer, changedtick and cursor still match its request, in insert
-- mode, with no popup menu. Python calls on_partial / on_done through nvim.async_call.
--
-- Other views of the same requests (the in-process language server, lua/rwkv/lsp.lua)
-- subscribe with M.subscribe(fn): fn("request" | "partial" | "done" | "cancel", data) is
-- called for every request, drawn or not, and S.result keeps the last finished one; they
-- ask for a position with M.request() like typing does, so no request is computed twice.
local config = require("rwkv.config")
local ghost = require("rwkv.ghost")
local float = require("rwkv.float")
local remote = require("rwkv.host")

local api = vim.api
local M = {}

---@class rwkv.Position
---@field buf integer
---@field tick integer
---@field row integer  0-based
---@field col integer  0-based byte column

local S = {
  seq = 0, -- last request id
  sent = nil, ---@type (rwkv.Position|{id: integer|nil, done: boolean})|nil  last request (id nil: dismissed)
  shown = nil, ---@type table|nil  {id, buf, tick, row, col, items: string[], index, done, consumed}
  result = nil, ---@type table|nil  {id, buf, tick, row, col, items: string[]}  the last finished request, drawn or not
  timer = nil, ---@type uv.uv_timer_t|nil
  last = nil, ---@type table|nil  stats of the last finished request
  stats = {}, ---@type table<integer, table>  stats of the last few finished requests by id (:RwkvStatus)
  requests = 0, -- counters for :RwkvStatus
  shown_count = 0,
  accepted = 0,
}
M.state = S

local function pos()
  local buf = api.nvim_get_current_buf()
  local cur = api.nvim_win_get_cursor(0)
  return { buf = buf, tick = api.nvim_buf_get_changedtick(buf), row = cur[1] - 1, col = cur[2] }
end

local function same(a, b)
  return a ~= nil and b ~= nil and a.buf == b.buf and a.tick == b.tick and a.row == b.row and a.col == b.col
end

local function in_insert()
  return api.nvim_get_mode().mode:sub(1, 1) == "i"
end

local function fire(pattern, data)
  pcall(api.nvim_exec_autocmds, "User", { pattern = pattern, modeline = false, data = data })
end

local subscribers = {} ---@type fun(kind: string, data: table)[]

--- Subscribe another view (lua/rwkv/lsp.lua) to every request's life: fn(kind, data) with
--- kind "request" {id, buf, tick, row, col}, "partial" {id, text}, "done" (S.result) or
--- "cancel" {id} (the running request was dropped: Esc, dismiss, :RwkvDisable). A view's
--- error never breaks the ghost text. Returns a function that unsubscribes.
---@param fn fun(kind: string, data: table)
function M.subscribe(fn)
  subscribers[#subscribers + 1] = fn
  return function()
    for i, f in ipairs(subscribers) do
      if f == fn then
        table.remove(subscribers, i)
        return
      end
    end
  end
end

local function tell(kind, data)
  for _, fn in ipairs(subscribers) do
    local ok, err = pcall(fn, kind, data)
    if not ok then
      vim.schedule(function()
        vim.notify("rwkv: internal error in a view: " .. tostring(err), vim.log.levels.ERROR, { title = "rwkv" })
      end)
    end
  end
end

local function stop_timer()
  if S.timer then
    S.timer:stop()
  end
end

--- Whether a result for position `p` may be drawn now.
local function drawable(p)
  return config.current.enabled and in_insert() and vim.fn.pumvisible() == 0 and same(p, pos())
end

local function blank(s)
  return s:match("^%s*$") ~= nil
end

-- text that cannot be shown or inserted as typed (a NUL byte from a model that produced
-- binary junk) is not a suggestion
local function unusable(s)
  return s:find("%z") ~= nil
end

local function render()
  local s = S.shown
  local c = config.current
  local text = s.items[s.index]
  local n = #s.items
  local use_float = c.float.enabled and s.done and n > 1
  local note = (not use_float and n > 1 and c.ghost.annotation) and ("(%d/%d)"):format(s.index, n) or nil
  local below = 0 -- screen lines the ghost text takes under the cursor line
  if c.ghost.enabled then
    ghost.show(s.buf, s.row, s.col, text, note, c.ghost.max_lines)
    below = select(2, text:gsub("\n", ""))
    if c.ghost.max_lines > 0 then
      below = math.min(below, c.ghost.max_lines - 1)
    end
  else
    ghost.clear()
  end
  if use_float then
    float.show(s.items, s.index, {
      max_lines = c.float.max_lines,
      max_width = c.float.max_width,
      border = c.float.border,
      below = below,
    })
  else
    float.close()
  end
end

--- Hide the ghost text and the float.
function M.hide()
  ghost.clear()
  float.close()
  S.shown = nil
end

--- Whether a suggestion is visible and still valid at the cursor. With the ghost text off
--- (ghost.enabled = false) only the float shows one: without it nothing is visible and
--- the keys do what they did before.
function M.visible()
  return S.shown ~= nil and drawable(S.shown) and (config.current.ghost.enabled or float.is_open())
end

--- The current candidate's full text (nil when none shows).
function M.current_text()
  if not M.visible() then
    return nil
  end
  return S.shown.items[S.shown.index]
end

--- All candidates shown and the selected index (nil when none shows).
function M.candidates()
  if not M.visible() then
    return nil
  end
  return vim.deepcopy(S.shown.items), S.shown.index
end

local function is_cont(s, i) -- byte i (1-based) of s is a UTF-8 continuation byte
  local b = s:byte(i)
  return b ~= nil and b >= 0x80 and b < 0xC0
end

--- `line` cut to at most `max` bytes around the 0-based byte column `col` (3/4 of them
--- before it), on UTF-8 character boundaries. Returns the text and the column in it.
---@param line string
---@param col integer
---@param max integer
---@return string, integer
function M.clip_line(line, col, max)
  if #line <= max then
    return line, col
  end
  col = math.min(col, #line)
  local from = math.max(1, col - math.floor(max * 3 / 4) + 1) -- 1-based first byte kept
  local to = math.min(#line, from + max - 1)
  for _ = 1, 3 do -- never start inside a character (at most 3 continuation bytes)
    if from <= col and is_cont(line, from) then
      from = from + 1
    end
  end
  for _ = 1, 3 do -- never end inside one
    if to > col and is_cont(line, to + 1) then
      to = to - 1
    end
  end
  return line:sub(from, to), col - (from - 1)
end

--- The window of lines around position `p` for a request: at most n_prefix lines above,
--- n_suffix below, each at most max_line_bytes bytes (the cursor line is cut around the
--- cursor). Returns lines, first line number, the cursor column in the cut cursor line.
---@param p rwkv.Position
function M.window(p)
  local first = math.max(0, p.row - config.engine("n_prefix"))
  local last = math.min(api.nvim_buf_line_count(p.buf), p.row + config.engine("n_suffix") + 1)
  local lines = api.nvim_buf_get_lines(p.buf, first, last, false)
  local max = config.engine("max_line_bytes")
  local col = p.col
  for i, line in ipairs(lines) do
    if #line > max then
      if first + i - 1 == p.row then
        lines[i], col = M.clip_line(line, p.col, max)
      else
        lines[i] = M.clip_line(line, 0, max)
      end
    end
  end
  return lines, first, col
end

--- Send a request for the cursor position now. `manual` skips the "already asked" check.
function M.request(manual)
  stop_timer()
  if not config.current.enabled or not in_insert() then
    return false
  end
  local p = pos()
  if not config.buffer_allowed(p.buf) then
    return false
  end
  if not manual and S.sent and same(S.sent, p) then
    return false
  end
  if not remote.state.started then
    require("rwkv").start_engine()
    if not remote.state.started then
      return false
    end
  end
  local lines, first, col = M.window(p)
  S.seq = S.seq + 1
  local req = {
    id = S.seq,
    buf = p.buf,
    tick = p.tick,
    filename = api.nvim_buf_get_name(p.buf),
    filetype = vim.bo[p.buf].filetype,
    lines = lines,
    first = first,
    row = p.row,
    col = col,
  }
  p.id, p.done = S.seq, false
  S.sent = p
  if remote.call("RwkvRequest", req) == nil then
    S.sent = nil
    return false
  end
  S.requests = S.requests + 1
  tell("request", { id = p.id, buf = p.buf, tick = p.tick, row = p.row, col = p.col })
  fire("RwkvRequestStarted", { id = req.id, buf = p.buf, row = p.row, col = p.col, manual = manual or false })
  return true
end

--- Whether typing may ask for position `p` by itself: auto_trigger is on and at most
--- max_line_suffix non-blank characters are right of the cursor.
---@param p rwkv.Position
function M.auto_allowed(p)
  if not config.current.auto_trigger then
    return false
  end
  -- text right of the cursor: look at a bounded piece (a line may be megabytes long)
  local limit = config.engine("max_line_suffix")
  local right = api.nvim_buf_get_text(p.buf, p.row, p.col, p.row, p.col + 4 * limit + 256, {})[1] or ""
  return vim.fn.strchars((right:gsub("%s", ""))) <= limit
end

--- Drop the running request `id` when no view needs it any more (the language server's
--- $/cancelRequest with the ghost text off): the engine stops it, as a keystroke would.
---@param id integer
function M.cancel(id)
  local s = S.sent
  if not s or s.id ~= id or s.done then
    return false
  end
  if remote.state.started then
    remote.call("RwkvCancel")
  end
  S.sent = nil -- asking here again sends a new request
  tell("cancel", { id = id })
  return true
end

--- Manual trigger: request even with text right of the cursor or auto_trigger off.
function M.trigger()
  M.hide()
  return M.request(true)
end

--- Follow typing that matches the shown suggestion: trim it instead of asking again.
local function typeahead(p)
  local s = S.shown
  if not s or not s.done or p.buf ~= s.buf or p.row ~= s.row or p.col <= s.col then
    return false
  end
  local line = api.nvim_buf_get_lines(p.buf, p.row, p.row + 1, false)[1] or ""
  local typed = line:sub(s.col + 1, p.col)
  local kept, index = {}, 1
  for i, t in ipairs(s.items) do
    if #t > #typed and t:sub(1, #typed) == typed and not blank(t:sub(#typed + 1)) then
      kept[#kept + 1] = t:sub(#typed + 1)
      if i == s.index then
        index = #kept
      end
    end
  end
  if #kept == 0 then
    return false
  end
  s.items, s.index, s.tick, s.col = kept, index, p.tick, p.col
  s.consumed = (s.consumed or "") .. typed
  S.sent = { id = s.id, buf = p.buf, tick = p.tick, row = p.row, col = p.col, done = true }
  render()
  return true
end

--- TextChangedI / CursorMovedI: drop a stale suggestion, schedule a new request.
function M.on_change()
  local p = pos()
  if S.shown and not same(S.shown, p) and not typeahead(p) then
    M.hide()
  end
  local c = config.current
  if not c.enabled or not c.auto_trigger or not in_insert() then
    return
  end
  if vim.fn.pumvisible() == 1 then
    M.hide()
    stop_timer()
    return
  end
  if (S.shown and same(S.shown, p)) or (S.sent and same(S.sent, p)) then
    return -- showing or already asked for this position
  end
  if not config.buffer_allowed(p.buf) then
    return
  end
  if not M.auto_allowed(p) then -- too much text right of the cursor
    stop_timer()
    return
  end
  S.timer = S.timer or vim.uv.new_timer()
  S.timer:stop()
  S.timer:start(c.debounce_ms, 0, vim.schedule_wrap(function()
    M.request(false)
  end))
end

--- From Python: the best row's text so far (ghost text only).
---@param msg {id: integer, text: string}
function M.on_partial(msg)
  local s = S.sent
  if not s or msg.id ~= s.id or s.done or type(msg.text) ~= "string" or blank(msg.text) or unusable(msg.text) then
    return
  end
  tell("partial", { id = s.id, text = msg.text })
  if not drawable(s) then
    return
  end
  S.shown = { id = s.id, buf = s.buf, tick = s.tick, row = s.row, col = s.col, items = { msg.text }, index = 1, done = false }
  render()
end

--- From Python: the final candidates and the request's stats (and "error" when it failed).
---@param msg {id: integer, candidates: {text: string, logprob: number}[], stats: table, error: string|nil}
function M.on_done(msg)
  if type(msg.error) == "string" and msg.error ~= "" then
    -- even for a request since replaced: it failed, :RwkvStatus shows it (notified once)
    require("rwkv").on_request_error(msg.error)
  end
  if type(msg.stats) == "table" then
    S.last = msg.stats
    if type(msg.id) == "number" and next(msg.stats) then
      S.stats[msg.id] = msg.stats
      S.stats[msg.id - 16] = nil -- the last 16 requests
    end
  end
  local s = S.sent
  if not s or msg.id ~= s.id then
    return
  end
  s.done = true
  -- keep the engine's order (never sort by logprob): its first candidate is the streamed
  -- text the ghost shows now, extended, so the ghost only grows and the extmark is updated
  -- in place (ghost.show reuses it)
  local items, seen = {}, {}
  for _, c in ipairs(type(msg.candidates) == "table" and msg.candidates or {}) do
    local t = type(c) == "table" and c.text or c
    if type(t) == "string" and not blank(t) and not unusable(t) and not seen[t] then
      seen[t] = true
      items[#items + 1] = t
    end
  end
  -- every view gets the result, also one not drawn here (a popup menu shows)
  S.result = { id = s.id, buf = s.buf, tick = s.tick, row = s.row, col = s.col, items = vim.deepcopy(items) }
  tell("done", S.result)
  if not drawable(s) then
    return
  end
  if #items == 0 then
    M.hide()
    return
  end
  S.shown = { id = s.id, buf = s.buf, tick = s.tick, row = s.row, col = s.col, items = items, index = 1, done = true }
  S.shown_count = S.shown_count + 1
  render()
  fire("RwkvSuggestionShown", { id = s.id, count = #items })
end

--- Select the next (delta 1) / previous (-1) candidate; the ghost text follows.
function M.cycle(delta)
  if not M.visible() then
    return false
  end
  local s = S.shown
  s.index = (s.index - 1 + delta) % #s.items + 1
  render()
  return true
end

--- The part of `text` that "accept line" inserts.
function M.first_line(text)
  if text:sub(1, 1) == "\n" then
    return "\n" .. (text:sub(2):match("^[^\n]*"))
  end
  return text:match("^[^\n]*")
end

--- The part of `text` that "accept word" inserts (UTF-8 safe: bytes >= 0x80 are word bytes).
function M.first_word(text)
  return text:match("^\n[ \t]*")
    or text:match("^[ \t]*[%w_\128-\255]+")
    or text:match("^[ \t]*[^%w_\128-\255%s]+")
    or text:match("^[ \t]+")
    or text:sub(1, 1)
end

--- An accept counts once, whichever view it came from: the statistics, the engine's
--- speculation (it continues after `accepted`, all the text inserted since request `id`'s
--- cursor) and the RwkvAccepted event.
local function record_accept(id, accepted, kind, part, via)
  S.accepted = S.accepted + 1
  if remote.state.started then
    remote.call("RwkvAccept", id, accepted)
  end
  fire("RwkvAccepted", { id = id, kind = kind, text = part, via = via })
end

--- A candidate of request `id` was inserted by another view (a completion menu through
--- the language server): count it like <Tab> and ask for the next suggestion at once.
---@param id integer
---@param accepted string  all the text inserted since the request's cursor
function M.accepted(id, accepted)
  if type(id) ~= "number" or type(accepted) ~= "string" or accepted == "" then
    return false
  end
  stop_timer()
  record_accept(id, accepted, "all", accepted, "lsp")
  M.hide()
  M.request(false) -- the engine continues from the accepted text
  return true
end

--- Insert (part of) the current candidate. kind: "all" | "line" | "word"; index picks a candidate.
---@return boolean accepted
function M.accept(kind, index)
  if not M.visible() then
    return false
  end
  local s = S.shown
  if index then
    if not s.items[index] then
      return false
    end
    s.index = index
  end
  local text = s.items[s.index]
  local part = (kind == "line" and M.first_line(text)) or (kind == "word" and M.first_word(text)) or text
  if part == "" then
    return false
  end
  stop_timer()
  local lines = vim.split(part, "\n", { plain = true })
  api.nvim_buf_set_text(s.buf, s.row, s.col, s.row, s.col, lines)
  local end_row = s.row + #lines - 1
  local end_col = (#lines == 1 and s.col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })

  local accepted = (s.consumed or "") .. part
  record_accept(s.id, accepted, kind, part)

  local rest = text:sub(#part + 1)
  local p = pos()
  if kind ~= "all" and not blank(rest) then
    -- keep showing the rest of this candidate where the cursor is now
    S.shown = { id = s.id, buf = p.buf, tick = p.tick, row = p.row, col = p.col, items = { rest }, index = 1, done = true, consumed = accepted }
    S.sent = { id = s.id, buf = p.buf, tick = p.tick, row = p.row, col = p.col, done = true }
    render()
  else
    M.hide()
    M.request(false) -- the next suggestion at once (the engine continues from the accepted text)
  end
  return true
end

--- Hide the suggestion and do not ask again at this position.
function M.dismiss()
  if not S.shown then
    return false
  end
  M.hide()
  stop_timer()
  local p = pos()
  local running = S.sent and not S.sent.done and S.sent.id
  if running and remote.state.started then
    remote.call("RwkvCancel")
  end
  S.sent = { id = nil, buf = p.buf, tick = p.tick, row = p.row, col = p.col, done = true }
  if running then
    tell("cancel", { id = running })
  end
  return true
end

--- InsertLeave / disable: hide, stop the timer and the running request.
function M.reset()
  stop_timer()
  M.hide()
  local running = S.sent and not S.sent.done and S.sent.id
  if running and remote.state.started then
    remote.call("RwkvCancel")
  end
  S.sent = nil
  if running then
    tell("cancel", { id = running })
  end
end

return M
