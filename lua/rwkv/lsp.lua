-- rwkv.nvim: an in-process language server (opt-in: setup({ lsp = { enabled = true } })).
--
-- vim.lsp.start() with a Lua function as `cmd` (no process, no socket), attached to the
-- buffers that get suggestions (config.buffer_allowed). It serves
-- - textDocument/completion: the candidates as completion items, for blink.cmp, nvim-cmp
--   (cmp-nvim-lsp) and Neovim's own vim.lsp.completion;
-- - textDocument/inlineCompletion (LSP 3.18): the same as InlineCompletionItems, for
--   Neovim 0.12's vim.lsp.inline_completion;
-- - workspace/executeCommand "rwkv.accept": every item's command, run by the menu after it
--   inserted the item. It counts the accept like <Tab> (statistics, the engine's
--   speculation) and completes an insertion the menu cut short (Neovim 0.11's completion
--   inserts only the first word of a text edit).
-- The server computes nothing itself: the ghost text, the float and this server are views
-- of suggest.lua's requests. An answer comes from the last finished request at that
-- position (with the text typed since filtered as the ghost text does), or waits for the
-- running request at that position, or sends the request typing would send and waits for
-- it. $/cancelRequest drops the wait (and the engine's work when no other view needs it).
local config = require("rwkv.config")
local suggest = require("rwkv.suggest")

local api = vim.api
local M = {}

M.NAME = "rwkv" -- the client's name (LspAttach, blink.cmp's item.client_name, cmp-nvim-lsp)
M.COMMAND = "rwkv.accept"
M.WAIT_MARGIN_MS = 3000 -- a wait ends after the engine's time_budget_ms plus this

local has_011 = vim.fn.has("nvim-0.11") == 1

-- LSP constants (vim.lsp.protocol), here so that loading this module stays cheap
local KIND_TEXT = 1 -- CompletionItemKind.Text
local PLAIN_TEXT = 1 -- InsertTextFormat.PlainText
local METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32601, -32602, -32603
local SERVER_RESULT_CALLBACK_ERROR = 7 -- vim.lsp.rpc.client_errors

local servers = {} ---@type table<table, true>  the live server instances (one per client)
local unsubscribe = nil ---@type fun()|nil
local group = nil ---@type integer|nil
local partial = { id = nil, text = nil } -- the running request's streamed text

-- -- positions ---------------------------------------------------------------------------

local function get_line(buf, row)
  if not api.nvim_buf_is_valid(buf) or row < 0 or row >= api.nvim_buf_line_count(buf) then
    return nil
  end
  return api.nvim_buf_get_lines(buf, row, row + 1, false)[1]
end

--- A byte column of `line` in the client's units ("utf-8" | "utf-16" | "utf-32").
local function to_units(line, byte, enc)
  byte = math.max(0, math.min(byte, #line))
  if enc == "utf-8" then
    return byte
  end
  if has_011 then
    return vim.str_utfindex(line, enc, byte, false)
  end
  local ok, u32, u16 = pcall(vim.str_utfindex, line, byte)
  if not ok then
    return byte
  end
  return enc == "utf-16" and u16 or u32
end

--- A position's character in the client's units as a byte column of `line`.
local function to_bytes(line, units, enc)
  units = math.max(0, units)
  if enc == "utf-8" then
    return math.min(units, #line)
  end
  if has_011 then
    return vim.str_byteindex(line, enc, units, false)
  end
  local ok, byte = pcall(vim.str_byteindex, line, units, enc == "utf-16")
  return ok and byte or #line
end

--- The buffer of a document URI without creating one (unnamed buffers all have the URI
--- "file://": the current buffer wins).
local function uri_buf(uri)
  if type(uri) ~= "string" then
    return nil
  end
  local cur = api.nvim_get_current_buf()
  if vim.uri_from_bufnr(cur) == uri then
    return cur
  end
  for _, b in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(b) and vim.uri_from_bufnr(b) == uri then
      return b
    end
  end
  return nil
end

local function same(a, b)
  return a ~= nil and b ~= nil and a.buf == b.buf and a.tick == b.tick and a.row == b.row and a.col == b.col
end

--- Whether position `q` is the cursor's now (a request can only be sent from there).
local function at_cursor(q)
  if api.nvim_get_current_buf() ~= q.buf then
    return false
  end
  local c = api.nvim_win_get_cursor(0)
  return c[1] - 1 == q.row and c[2] == q.col and api.nvim_buf_get_changedtick(q.buf) == q.tick
end

local function current(q) -- the buffer has not changed since position q was taken
  return api.nvim_buf_is_valid(q.buf) and api.nvim_buf_get_changedtick(q.buf) == q.tick
end

local function blank(s)
  return s:match("^%s*$") ~= nil
end

-- -- items -------------------------------------------------------------------------------

--- What the ghost text shows at `q` (the rest of a candidate after "accept line"):
--- {id, full (all the text since the request's cursor), rest}.
local function shown_at(q)
  local s = suggest.state.shown
  if not s or not s.done or not same(s, q) then
    return nil
  end
  local out = {}
  for _, t in ipairs(s.items) do
    out[#out + 1] = { id = s.id, full = (s.consumed or "") .. t, rest = t }
  end
  return #out > 0 and out or nil
end

--- The candidates of the last finished request that apply at `q`: the request was made
--- on this line at or before q.col, and the text typed since is the start of the
--- candidate (as the ghost text follows typing). {id, full, rest}: the whole candidate
--- and what is left of it at q. Else what the ghost text shows there.
local function candidates_at(q)
  local r = suggest.state.result
  if not r or r.buf ~= q.buf or r.row ~= q.row or q.col < r.col or #r.items == 0 then
    return shown_at(q)
  end
  if q.col == r.col and r.tick ~= q.tick then
    return shown_at(q) -- the same column, another text
  end
  local line = get_line(q.buf, q.row)
  if not line or #line < q.col then
    return nil
  end
  local typed = line:sub(r.col + 1, q.col)
  local out = {}
  for _, t in ipairs(r.items) do
    if #t > #typed and t:sub(1, #typed) == typed and not blank(t:sub(#typed + 1)) then
      out[#out + 1] = { id = r.id, full = t, rest = t:sub(#typed + 1) }
    end
  end
  return #out > 0 and out or shown_at(q)
end

local function fenced(text, filetype)
  local fence = "```"
  while text:find(fence, 1, true) do
    fence = fence .. "`"
  end
  return ("%s%s\n%s\n%s"):format(fence, filetype or "", text, fence)
end

--- What a menu shows for `text` (the typed `word` and the candidate): its first line;
--- when that holds nothing but the word, also "⏎ " and the next non-blank line.
local function label_of(text, word)
  local first = text:match("^[^\n]*")
  local head = first:gsub("^%s+", "")
  if blank(first:sub(#word + 1)) then
    local nxt = text:match("\n%s*([^\n]*%S)")
    if nxt then
      return head .. (head ~= "" and " " or "") .. "⏎ " .. nxt
    end
  end
  return head ~= "" and head or "⏎"
end

--- LSP items for candidates `cands` at `q` (encoding `enc`). The text edit replaces the
--- word before the cursor (its start: the start of the typed keyword) with that word and
--- the rest of the candidate, so that every menu's filter sees the typed word first (the
--- word is written back as it was: a wider word than the client's keyword is harmless).
---@param kind "completion"|"inline"
local function make_items(kind, q, cands, enc)
  local line = get_line(q.buf, q.row) or ""
  -- "-" too: a client whose keyword is wider (blink.cmp: "font-s") still finds the typed text
  local word = line:sub(1, q.col):match("[%w_%-\128-\255]*$")
  local start = q.col - #word
  local range = {
    start = { line = q.row, character = to_units(line, start, enc) },
    ["end"] = { line = q.row, character = to_units(line, q.col, enc) },
  }
  local filetype = vim.bo[q.buf].filetype
  local items = {}
  for i, c in ipairs(cands) do
    local new_text = word .. c.rest
    local command = {
      title = "rwkv: accept",
      command = M.COMMAND,
      -- accepted: all the text inserted since the request's cursor (for the speculation)
      arguments = { { id = c.id, accepted = c.full, buf = q.buf, row = q.row, col = start, text = new_text } },
    }
    if kind == "inline" then
      items[i] = { insertText = new_text, range = vim.deepcopy(range), command = command }
    else
      local nlines = select(2, new_text:gsub("\n", "")) + 1
      items[i] = {
        label = label_of(new_text, word),
        labelDetails = { description = M.NAME },
        kind = KIND_TEXT,
        detail = nlines > 1 and ("rwkv (%d lines)"):format(nlines) or "rwkv",
        documentation = { kind = "markdown", value = fenced(new_text, filetype) },
        sortText = ("%04d"):format(i),
        filterText = new_text:match("^[^\n]*"),
        insertTextFormat = PLAIN_TEXT,
        textEdit = { range = vim.deepcopy(range), newText = new_text },
        command = command,
        data = { rwkv = { id = c.id, index = i } },
      }
    end
  end
  return items
end

local function result(kind, items, incomplete)
  if kind == "inline" then
    return { items = items or {} }
  end
  return { isIncomplete = incomplete, items = items or {} }
end

-- -- the server --------------------------------------------------------------------------

local Server = {}
Server.__index = Server

local function new_server(dispatchers)
  local self = setmetatable({
    dispatchers = dispatchers,
    closing = false,
    next_id = 0,
    requests = {}, ---@type table<integer, {callback: function, notify_reply: function|nil, answered: boolean|nil, cancelled: boolean|nil}>
    waiting = {}, ---@type table<integer, {kind: string, q: table, rid: integer, timer: uv.uv_timer_t|nil}>
    encoding = "utf-16",
  }, Server)
  servers[self] = true
  return self
end

--- Answer request `id` (once). Replies are delivered from the event loop, never inside
--- the client's request() call; a cancelled request gets the reply notice only, as
--- Neovim's RPC client drops a RequestCancelled reply.
function Server:respond(id, err, res)
  local r = self.requests[id]
  if not r or r.answered then
    return
  end
  r.answered = true
  vim.schedule(function()
    self.requests[id] = nil
    if r.notify_reply then
      pcall(r.notify_reply, id)
    end
    if r.cancelled or not r.callback then
      return
    end
    local ok, e = pcall(r.callback, err, res)
    if not ok and self.dispatchers and self.dispatchers.on_error then
      pcall(self.dispatchers.on_error, SERVER_RESULT_CALLBACK_ERROR, e)
    end
  end)
end

local function stop_timer(w)
  if w.timer then
    w.timer:stop()
    if not w.timer:is_closing() then
      w.timer:close()
    end
    w.timer = nil
  end
end

--- End the wait of request `id` with `res` (a result table).
function Server:finish(id, res)
  local w = self.waiting[id]
  if w then
    stop_timer(w)
    self.waiting[id] = nil
  end
  self:respond(id, nil, res)
end

--- The answer for waiter `w` now: the finished request's candidates at its position, or
--- (partial = true) the text streamed so far; an empty incomplete list when the buffer
--- changed meanwhile (the client asks again).
function Server:answer_for(w, use_partial)
  if not current(w.q) then
    return result(w.kind, {}, true)
  end
  local cands = candidates_at(w.q)
  if not cands and use_partial and partial.id == w.rid and partial.text then
    cands = { { id = w.rid, full = partial.text, rest = partial.text } }
  end
  return result(w.kind, cands and make_items(w.kind, w.q, cands, self.encoding) or {}, true)
end

--- Wait for request `rid` (suggest.lua's) to answer LSP request `id`.
function Server:wait(id, kind, q, rid)
  local w = { kind = kind, q = q, rid = rid }
  self.waiting[id] = w
  local ms = math.max(0, tonumber(config.engine("time_budget_ms")) or 1000) + M.WAIT_MARGIN_MS
  w.timer = vim.uv.new_timer()
  w.timer:start(ms, 0, vim.schedule_wrap(function()
    if self.waiting[id] == w then
      self:finish(id, self:answer_for(w, true)) -- what is there; the client asks again
    end
  end))
end

--- textDocument/completion and textDocument/inlineCompletion.
---@param kind "completion"|"inline"
function Server:complete(id, kind, params)
  local td, p = params.textDocument, params.position
  local buf = type(td) == "table" and uri_buf(td.uri) or nil
  local line = buf and type(p) == "table" and type(p.line) == "number" and get_line(buf, p.line)
  if not line or type(p.character) ~= "number" then
    return self:respond(id, nil, result(kind, {}, false))
  end
  if not config.current.enabled or not config.buffer_allowed(buf) then
    return self:respond(id, nil, result(kind, {}, false)) -- nothing will come here
  end
  local q = { buf = buf, row = p.line, col = to_bytes(line, p.character, self.encoding),
    tick = api.nvim_buf_get_changedtick(buf) }
  local sent = suggest.state.sent
  if sent and sent.id == nil and same(sent, q) then
    return self:respond(id, nil, result(kind, {}, true)) -- dismissed here (<C-]>)
  end
  local cands = candidates_at(q)
  if cands then
    return self:respond(id, nil, result(kind, make_items(kind, q, cands, self.encoding), true))
  end
  -- the model still loads: a request waits for it (the ghost text shows its answer), a
  -- menu gets an empty list now and asks again as the user types
  local loaded = require("rwkv").status().loaded
  if sent and same(sent, q) then
    if not sent.done and loaded then
      return self:wait(id, kind, q, sent.id) -- the running request: one computation for all views
    end
    return self:respond(id, nil, result(kind, {}, true)) -- loading, or nothing usable came
  end
  -- nothing asked for this position yet: ask as typing would
  if at_cursor(q) and suggest.auto_allowed(q) and suggest.request(false) and loaded then
    return self:wait(id, kind, q, suggest.state.sent.id)
  end
  return self:respond(id, nil, result(kind, {}, true))
end

--- Whether a drawn view (ghost text, float) still needs request `rid`.
local function drawn_view_needs(rid)
  local c = config.current
  local s = suggest.state.sent
  return (c.ghost.enabled or c.float.enabled) and s ~= nil and s.id == rid and at_cursor(s)
    and vim.fn.pumvisible() == 0
end

local function waited_for(rid)
  for srv in pairs(servers) do
    for _, w in pairs(srv.waiting) do
      if w.rid == rid then
        return true
      end
    end
  end
  return false
end

--- $/cancelRequest: drop the wait; stop the engine's work when no view needs it any more.
function Server:cancel(id)
  local r = self.requests[id]
  if not r then
    return
  end
  r.cancelled = true
  local w = self.waiting[id]
  self:finish(id, nil)
  if w and not waited_for(w.rid) and not drawn_view_needs(w.rid) then
    suggest.cancel(w.rid)
  end
end

local handlers = {}

function handlers.initialize(self, id, params)
  -- the client's position encoding: UTF-16 (LSP's default) when offered
  local offered = vim.tbl_get(params, "capabilities", "general", "positionEncodings")
  if type(offered) == "table" and #offered > 0 and not vim.tbl_contains(offered, "utf-16") then
    for _, e in ipairs(offered) do
      if e == "utf-8" or e == "utf-32" then
        self.encoding = e
        break
      end
    end
  end
  self:respond(id, nil, {
    capabilities = {
      positionEncoding = self.encoding,
      completionProvider = { triggerCharacters = M.trigger_characters(), resolveProvider = false },
      inlineCompletionProvider = true,
      executeCommandProvider = { commands = { M.COMMAND } },
    },
    serverInfo = { name = M.NAME },
  })
end

function handlers.shutdown(self, id)
  self:respond(id, nil, vim.NIL)
end

handlers["textDocument/completion"] = function(self, id, params)
  self:complete(id, "completion", params)
end

handlers["textDocument/inlineCompletion"] = function(self, id, params)
  self:complete(id, "inline", params)
end

handlers["workspace/executeCommand"] = function(self, id, params)
  if params.command ~= M.COMMAND then
    return self:respond(id, { code = INVALID_PARAMS, message = "rwkv: unknown command " .. tostring(params.command) })
  end
  M.accept(type(params.arguments) == "table" and params.arguments[1] or nil)
  self:respond(id, nil, vim.NIL)
end

function Server:request(method, params, callback, notify_reply)
  if self.closing then
    return false
  end
  self.next_id = self.next_id + 1
  local id = self.next_id
  self.requests[id] = { callback = callback, notify_reply = notify_reply }
  local handler = handlers[method]
  if not handler then
    self:respond(id, { code = METHOD_NOT_FOUND, message = "rwkv: " .. tostring(method) .. " is not supported" })
  else
    local ok, err = pcall(handler, self, id, type(params) == "table" and params or {})
    if not ok then
      self:respond(id, { code = INTERNAL_ERROR, message = "rwkv: " .. tostring(err) })
    end
  end
  return true, id
end

function Server:close()
  if self.closing then
    return
  end
  self.closing = true
  servers[self] = nil
  for id in pairs(self.waiting) do
    self:finish(id, nil)
  end
  vim.schedule(function()
    if self.dispatchers and self.dispatchers.on_exit then
      self.dispatchers.on_exit(0, 0)
    end
  end)
end

function Server:notify(method, params)
  if self.closing then
    return false
  end
  if method == "$/cancelRequest" then
    self:cancel(type(params) == "table" and params.id or nil)
  elseif method == "exit" then
    self:close()
  end
  return true
end

--- `cmd` of vim.lsp.start(): a new server for a new client (vim.lsp.rpc.PublicClient).
---@param dispatchers vim.lsp.rpc.Dispatchers
function M.cmd(dispatchers)
  local srv = new_server(dispatchers)
  return {
    request = function(method, params, callback, notify_reply)
      return srv:request(method, params, callback, notify_reply)
    end,
    notify = function(method, params)
      return srv:notify(method, params)
    end,
    is_closing = function()
      return srv.closing
    end,
    terminate = function()
      srv:close()
    end,
  }
end

--- The completionProvider's triggerCharacters from lsp.trigger_characters.
function M.trigger_characters()
  local tc = config.current.lsp.trigger_characters
  if tc == true then
    local all = {}
    for b = 32, 126 do
      all[#all + 1] = string.char(b)
    end
    return all
  end
  return type(tc) == "table" and vim.deepcopy(tc) or {}
end

-- -- suggest.lua's requests ---------------------------------------------------------------

local function on_request_event(kind, data)
  if kind == "partial" then
    partial.id, partial.text = data.id, data.text
    return
  end
  if kind == "request" then
    partial.id, partial.text = data.id, nil
  end
  for srv in pairs(servers) do
    for id, w in pairs(srv.waiting) do
      if kind == "done" and w.rid == data.id then
        srv:finish(id, srv:answer_for(w, false))
      elseif kind == "cancel" and w.rid == data.id then
        srv:finish(id, result(w.kind, {}, true))
      elseif kind == "request" and w.rid ~= data.id then
        if same(w.q, data) then
          w.rid = data.id -- the same position asked again (the trigger key): wait for that one
        else
          srv:finish(id, result(w.kind, {}, true)) -- superseded, as by a keystroke
        end
      end
    end
  end
end

-- -- accepting ---------------------------------------------------------------------------

--- The command of an item the menu inserted: finish a cut-short insertion, then count the
--- accept like <Tab> (suggest.accepted: statistics, RwkvAccept, the next request).
---@param a {id: integer, accepted: string, buf: integer, row: integer, col: integer, text: string}|nil
local last_accept = nil ---@type {key: string, buf: integer, tick: integer}|nil

function M.accept(a)
  if type(a) ~= "table" or type(a.text) ~= "string" then
    return false
  end
  local buf, row, col = a.buf, a.row, a.col
  local key = ("%s:%s:%s:%s"):format(tostring(a.id), tostring(row), tostring(col), a.text)
  if last_accept and last_accept.key == key and last_accept.buf == buf and api.nvim_buf_is_valid(buf)
      and api.nvim_buf_get_changedtick(buf) == last_accept.tick then
    return false -- the same accept again (our CompleteDone, then vim.lsp.completion's command)
  end
  if buf == api.nvim_get_current_buf() and type(row) == "number" and type(col) == "number" then
    local cur = api.nvim_win_get_cursor(0)
    local line = get_line(buf, row)
    if line and cur[1] - 1 == row and cur[2] >= col then
      local inserted = line:sub(col + 1, cur[2])
      if #inserted < #a.text and a.text:sub(1, #inserted) == inserted then
        -- Neovim 0.11's completion inserts the first word of the text edit: add the rest
        local lines = vim.split(a.text:sub(#inserted + 1), "\n", { plain = true })
        api.nvim_buf_set_text(buf, row, cur[2], row, cur[2], lines)
        local end_col = (#lines == 1 and cur[2] or 0) + #lines[#lines]
        api.nvim_win_set_cursor(0, { row + #lines, end_col })
      end
    end
  end
  local ok = suggest.accepted(a.id, a.accepted or a.text)
  if api.nvim_buf_is_valid(buf or -1) then
    last_accept = { key = key, buf = buf, tick = api.nvim_buf_get_changedtick(buf) }
  end
  return ok
end

-- -- Neovim's own popup menu (omnifunc, vim.lsp.completion) ---------------------------------

--- Our LSP item in a complete-item (v:completed_item, v:event.completed_item), else nil.
local function our_item(ci)
  local lsp = type(ci) == "table" and vim.tbl_get(ci, "user_data", "nvim", "lsp") or nil
  if type(lsp) ~= "table" or lsp.client_id ~= M.client_id() then
    return nil
  end
  local item = lsp.completion_item
  if type(item) == "table" and vim.tbl_get(item, "command", "command") == M.COMMAND then
    return item
  end
end

--- CompleteDone: an item of ours accepted from Neovim's menu. The omnifunc
--- (<C-x><C-o>, vim.lsp.omnifunc) inserts only the first word of a text edit and runs no
--- command: finish the insertion and count it here (vim.lsp.completion's own command
--- call after this one is recognised as the same accept).
local function on_complete_done()
  local reason = (vim.v.event or {}).reason
  if reason ~= nil and reason ~= "accept" then
    return
  end
  local item = our_item(vim.v.completed_item)
  if item then
    M.accept(item.command.arguments and item.command.arguments[1] or nil)
  end
end

local styled = nil ---@type integer|nil  the info buffer we gave a syntax to

--- CompleteChanged: the info popup of an item of ours shows the candidate as code in the
--- buffer's language (the item's documentation is a markdown code block, which Neovim
--- 0.11's popup shows raw, fences included); other items' popups are left as they are.
local function on_complete_changed()
  if not api.nvim__complete_set then
    return
  end
  local ev = vim.v.event or {}
  local item = our_item(ev.completed_item)
  local info = vim.fn.complete_info({ "selected" })
  if not item then
    if styled and api.nvim_buf_is_valid(styled) then
      pcall(function()
        vim.bo[styled].syntax = ""
      end)
    end
    styled = nil
    return
  end
  local text = vim.tbl_get(item, "textEdit", "newText") or item.insertText or item.label
  local ok, win = pcall(api.nvim__complete_set, info.selected, { info = text })
  if ok and type(win) == "table" and win.bufnr and api.nvim_buf_is_valid(win.bufnr) then
    local ft = vim.bo.filetype
    pcall(function()
      vim.bo[win.bufnr].syntax = ft ~= "" and ft or "text"
    end)
    styled = win.bufnr
  end
end

-- -- attaching ---------------------------------------------------------------------------

local client_id = nil ---@type integer|nil

local function live_client()
  local client = client_id and vim.lsp.get_client_by_id(client_id)
  if not client then
    return nil
  end
  local ok, stopped = pcall(function()
    if has_011 then
      return client:is_stopped()
    end
    return client.is_stopped()
  end)
  if not ok or stopped then
    return nil
  end
  return client
end

--- The client's id (nil when the server is off or not started yet).
function M.client_id()
  local c = live_client()
  return c and c.id or nil
end

--- Attach the server to `buf` when suggestions are allowed there (starting it the first
--- time); detach it where they are not (any more). Returns the client id or nil.
---@param buf integer|nil
function M.attach(buf)
  buf = (buf == nil or buf == 0) and api.nvim_get_current_buf() or buf
  if not api.nvim_buf_is_valid(buf) or not api.nvim_buf_is_loaded(buf) then
    return nil
  end
  local client = live_client()
  if not config.current.lsp.enabled or not config.buffer_allowed(buf) then
    if client and vim.lsp.buf_is_attached(buf, client.id) then
      vim.lsp.buf_detach_client(buf, client.id)
    end
    return nil
  end
  if client then
    if not vim.lsp.buf_is_attached(buf, client.id) then
      vim.lsp.buf_attach_client(buf, client.id)
    end
    return client.id
  end
  client_id = vim.lsp.start({ name = M.NAME, cmd = M.cmd }, {
    bufnr = buf,
    reuse_client = function(c, conf)
      local ok, stopped = pcall(function()
        return has_011 and c:is_stopped() or (not has_011 and c.is_stopped())
      end)
      return c.name == conf.name and ok and not stopped
    end,
  })
  return client_id
end

--- Stop the server (lsp.enabled = false in a new setup()).
function M.stop()
  if group then
    pcall(api.nvim_del_augroup_by_id, group)
    group = nil
  end
  local client = live_client()
  if client then
    if has_011 then
      client:stop(true)
    else
      client.stop(true)
    end
  end
  client_id = nil
end

--- From setup(): start serving (lsp.enabled) or stop.
---@param opts {enabled: boolean, trigger_characters: boolean|string[]}
function M.setup(opts)
  if not opts.enabled then
    M.stop()
    return
  end
  local client = live_client()
  if client and not vim.deep_equal(vim.tbl_get(client.server_capabilities or {}, "completionProvider",
        "triggerCharacters") or {}, M.trigger_characters()) then
    M.stop() -- new trigger characters: a new server announces them
  end
  unsubscribe = unsubscribe or suggest.subscribe(on_request_event)
  group = api.nvim_create_augroup("rwkv_lsp", { clear = true })
  api.nvim_create_autocmd("CompleteDone", {
    group = group,
    desc = "rwkv: finish an item of ours accepted from Neovim's menu (the omnifunc)",
    callback = on_complete_done,
  })
  api.nvim_create_autocmd("CompleteChanged", {
    group = group,
    desc = "rwkv: show an item of ours as code in the menu's info popup",
    callback = on_complete_changed,
  })
  api.nvim_create_autocmd({ "BufEnter", "FileType", "InsertEnter" }, {
    group = group,
    desc = "rwkv: attach the in-process language server",
    callback = function(ev)
      M.attach(ev.buf)
    end,
  })
  if vim.v.vim_did_enter == 1 then
    M.attach(api.nvim_get_current_buf())
  else -- setup() from the user's init: nothing starts before the first buffer is entered
    api.nvim_create_autocmd("VimEnter", {
      group = group,
      once = true,
      desc = "rwkv: attach the in-process language server",
      callback = function()
        M.attach(api.nvim_get_current_buf())
      end,
    })
  end
end

return M
