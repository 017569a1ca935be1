-- rwkv.nvim: the candidate window. A non-focusable float beside the cursor that lists
-- every candidate, numbered, a few lines each, the current one highlighted. It is
-- placed below the ghost text's lines when there is room (else above the cursor line), so
-- that it covers neither the cursor line nor the ghost text nor the code above it that
-- one is reading, and it never takes the focus.
local M = {}

M.ns = vim.api.nvim_create_namespace("rwkv_float")

local state = {
  buf = nil, ---@type integer|nil
  win = nil, ---@type integer|nil
  ranges = {}, ---@type {first: integer, last: integer}[]  0-based float lines per candidate
  hidden = false, -- closing failed (textlock, e.g. in CompleteChanged): hidden, closed when allowed
  closing = false, -- such a close is scheduled
}

function M.define_highlights()
  vim.api.nvim_set_hl(0, "RwkvFloat", { link = "NormalFloat", default = true })
  vim.api.nvim_set_hl(0, "RwkvFloatBorder", { link = "FloatBorder", default = true })
  vim.api.nvim_set_hl(0, "RwkvFloatSelected", { link = "PmenuSel", default = true })
  vim.api.nvim_set_hl(0, "RwkvFloatNumber", { link = "Number", default = true })
end

local function scratch_buf()
  if state.buf and vim.api.nvim_buf_is_valid(state.buf) then
    return state.buf
  end
  state.buf = vim.api.nvim_create_buf(false, true)
  vim.bo[state.buf].bufhidden = "hide"
  vim.bo[state.buf].filetype = "rwkv_candidates"
  return state.buf
end

--- Render candidate texts into display lines.
---@param items string[]
---@param opts {max_lines: integer, ts: integer}
---@return string[] lines, {first: integer, last: integer}[] ranges
function M.layout(items, opts)
  local ghost = require("rwkv.ghost")
  local lines, ranges = {}, {}
  local width = #tostring(#items)
  for i, text in ipairs(items) do
    local tlines = vim.split(text, "\n", { plain = true })
    local first = #lines
    local shown = math.min(#tlines, opts.max_lines)
    for j = 1, shown do
      local body = ghost.expand_tabs(tlines[j], 0, opts.ts)
      if j == 1 and body == "" and #tlines > 1 then
        body = "⏎"
      end
      local prefix = j == 1 and string.format("%" .. width .. "d ", i) or string.rep(" ", width + 1)
      if j == shown and #tlines > shown then
        body = body .. (" … +%d"):format(#tlines - shown)
      end
      lines[#lines + 1] = prefix .. body
    end
    ranges[i] = { first = first, last = #lines - 1 }
  end
  return lines, ranges
end

local function highlight(index)
  local buf = state.buf
  vim.api.nvim_buf_clear_namespace(buf, M.ns, 0, -1)
  local width = #tostring(#state.ranges)
  for i, r in ipairs(state.ranges) do
    vim.api.nvim_buf_set_extmark(buf, M.ns, r.first, 0, { end_col = width, hl_group = "RwkvFloatNumber" })
    if i == index then
      for l = r.first, r.last do
        vim.api.nvim_buf_set_extmark(buf, M.ns, l, 0, { line_hl_group = "RwkvFloatSelected", priority = 100 })
      end
    end
  end
end

local function title(index, n)
  return (" rwkv %d/%d "):format(index, n)
end

--- Show (or update) the window for `items` with `index` selected.
---@param items string[]
---@param index integer
---@param opts {max_lines: integer, max_width: integer, border: any, below: integer}
---   below: screen lines the ghost text takes under the cursor line
function M.show(items, index, opts)
  local buf = scratch_buf()
  local lines, ranges = M.layout(items, { max_lines = opts.max_lines, ts = vim.bo.tabstop })
  state.ranges = ranges
  vim.api.nvim_buf_set_lines(buf, 0, -1, false, lines)

  local width = 1
  for _, l in ipairs(lines) do
    width = math.max(width, vim.fn.strdisplaywidth(l))
  end
  local has_border = opts.border ~= "none" and opts.border ~= ""
  local frame = has_border and 2 or 0
  width = math.min(width + 1, opts.max_width, math.max(10, vim.o.columns - frame - 2))
  local height = math.min(#lines, math.max(1, vim.o.lines - 4 - frame))

  -- below the cursor line and the ghost text's lines when it fits there, else above the
  -- cursor line, else on the side with more room (shorter); never over the cursor line
  local below = opts.below or 0
  local winline = vim.fn.winline()
  local room_above = winline - 1
  local room_below = math.max(0, vim.api.nvim_win_get_height(0) - winline - below)
  local cfg = {
    relative = "cursor",
    col = 0,
    width = width,
    style = "minimal",
    border = opts.border,
    focusable = false,
    zindex = 60,
  }
  local up = room_below < height + frame and (room_above >= height + frame or room_above > room_below)
  if up then
    cfg.row, cfg.anchor = 0, "SW"
    height = math.max(1, math.min(height, room_above - frame))
  else
    cfg.row, cfg.anchor = 1 + below, "NW"
    height = math.max(1, math.min(height, room_below - frame))
  end
  cfg.height = height
  if has_border then
    cfg.title = title(index, #items)
    cfg.title_pos = "right"
  end

  if not (state.win and vim.api.nvim_win_is_valid(state.win)) then
    state.win = M.stray_windows()[1] -- a window of ours that was lost track of: reuse it
  end
  for _, w in ipairs(M.stray_windows()) do -- never more than one
    if w ~= state.win then
      pcall(vim.api.nvim_win_close, w, true)
    end
  end
  if state.win then
    if vim.fn.has("nvim-0.10") == 1 then
      cfg.hide = false
    end
    vim.api.nvim_win_set_config(state.win, cfg)
    state.hidden = false
  else
    cfg.noautocmd = true
    state.win = vim.api.nvim_open_win(buf, false, cfg)
    state.hidden = false
    vim.wo[state.win].wrap = false
    vim.wo[state.win].winhighlight = "Normal:RwkvFloat,NormalFloat:RwkvFloat,FloatBorder:RwkvFloatBorder"
  end
  highlight(index)
  pcall(vim.api.nvim_win_set_cursor, state.win, { ranges[index].first + 1, 0 })
end

function M.is_open()
  return state.win ~= nil and not state.hidden and vim.api.nvim_win_is_valid(state.win)
end

--- Every window that shows the candidate buffer (at most one once show() or close() ran).
function M.stray_windows()
  if not (state.buf and vim.api.nvim_buf_is_valid(state.buf)) then
    return {}
  end
  return vim.fn.win_findbuf(state.buf)
end

--- Lines currently shown (tests and debugging).
function M.lines()
  if not M.is_open() then
    return nil
  end
  return vim.api.nvim_buf_get_lines(state.buf, 0, -1, false)
end

function M.win()
  return M.is_open() and state.win or nil
end

--- Close the window. Where Neovim forbids closing windows now (textlock: CompleteChanged,
--- an expression mapping) it is hidden at once and closed as soon as that is allowed; it
--- stays tracked meanwhile, so that it can never be left on screen.
function M.close()
  local win = state.win
  if not win then
    return
  end
  if not vim.api.nvim_win_is_valid(win) then
    state.win, state.hidden = nil, false
    return
  end
  if pcall(vim.api.nvim_win_close, win, true) then
    state.win, state.hidden = nil, false
    return
  end
  if not state.hidden then
    state.hidden = true
    pcall(vim.api.nvim_win_set_config, win, { hide = true })
  end
  if state.closing then
    return -- a close is scheduled
  end
  state.closing = true
  vim.schedule(function()
    state.closing = false
    if state.win == win and state.hidden and vim.api.nvim_win_is_valid(win)
        and pcall(vim.api.nvim_win_close, win, true) then
      state.win, state.hidden = nil, false
    end -- else it stays hidden and tracked: the next show() reuses it, the next close() retries
  end)
end

return M
