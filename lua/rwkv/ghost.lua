-- rwkv.nvim: ghost text. One reused extmark: the first suggestion line is inline virtual
-- text at the cursor, further lines are virt_lines below the cursor line (at most
-- ghost.max_lines lines in all; the float and <Tab> have the whole candidate).
local M = {}

M.ns = vim.api.nvim_create_namespace("rwkv_ghost")
M.hl = "RwkvSuggestion"
M.hl_annotation = "RwkvAnnotation"

---@type {buf: integer, id: integer}|nil
local mark = nil

--- Default highlight links (`default = true`: a colorscheme or the user wins).
function M.define_highlights()
  vim.api.nvim_set_hl(0, M.hl, { link = "Comment", default = true })
  vim.api.nvim_set_hl(0, M.hl_annotation, { link = "MoreMsg", default = true })
end

--- Replace tabs by spaces as they would display starting at screen column `vcol`.
---@param s string
---@param vcol integer  display column (0-based) where `s` starts
---@param ts integer    'tabstop'
function M.expand_tabs(s, vcol, ts)
  if not s:find("\t", 1, true) then
    return s
  end
  local out, col = {}, vcol
  for piece, tab in s:gmatch("([^\t]*)(\t?)") do
    out[#out + 1] = piece
    col = col + vim.fn.strdisplaywidth(piece)
    if tab ~= "" then
      local n = ts - (col % ts)
      out[#out + 1] = string.rep(" ", n)
      col = col + n
    end
  end
  return table.concat(out)
end

--- Show `text` as a suggestion at (row, col) (0-based, byte column) in `buf`.
---@param buf integer
---@param row integer
---@param col integer
---@param text string
---@param annotation string|nil  e.g. "(2/4)"
---@param max_lines integer|nil  most lines shown (the first inline, the rest as virtual
---   lines); the ones cut are counted in a "… +N lines" note. nil or 0: all
function M.show(buf, row, col, text, annotation, max_lines)
  local lines = vim.split(text, "\n", { plain = true })
  local cut = 0
  if max_lines and max_lines > 0 and #lines > max_lines then
    cut = #lines - max_lines
    lines = vim.list_slice(lines, 1, max_lines)
  end
  local ts = vim.bo[buf].tabstop
  local line = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ""
  col = math.min(col, #line)
  -- the display column only matters for tabs (and costs O(col) on a very long line);
  -- a NUL byte (shown as ^@) would turn the string into a Blob for strdisplaywidth()
  local start_vcol = lines[1]:find("\t", 1, true)
      and vim.fn.strdisplaywidth((line:sub(1, col):gsub("%z", "^@"))) or 0

  local virt_text = {}
  if lines[1] ~= "" then
    virt_text[1] = { M.expand_tabs(lines[1], start_vcol, ts), M.hl }
  end
  local virt_lines = {}
  for i = 2, #lines do
    virt_lines[#virt_lines + 1] = { { M.expand_tabs(lines[i], 0, ts), M.hl } }
  end
  if cut > 0 then -- the buffer does not jump by the whole candidate's height while typing
    annotation = ("… +%d line%s%s"):format(cut, cut == 1 and "" or "s", annotation and (" " .. annotation) or "")
  end
  if annotation then
    local note = { " " .. annotation, M.hl_annotation }
    if #virt_lines > 0 then
      table.insert(virt_lines[#virt_lines], note)
    else
      virt_text[#virt_text + 1] = note
    end
  end

  local opts = {
    virt_text = #virt_text > 0 and virt_text or nil,
    virt_text_pos = #virt_text > 0 and "inline" or nil,
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
    priority = 200,
    right_gravity = true,
  }
  if mark and mark.buf == buf and vim.api.nvim_buf_is_valid(buf) then
    opts.id = mark.id
  else
    M.clear()
  end
  local ok, id = pcall(vim.api.nvim_buf_set_extmark, buf, M.ns, row, col, opts)
  if ok then
    mark = { buf = buf, id = id }
  else
    mark = nil
  end
  return ok
end

--- Remove the suggestion (if any).
function M.clear()
  if mark and vim.api.nvim_buf_is_valid(mark.buf) then
    pcall(vim.api.nvim_buf_del_extmark, mark.buf, M.ns, mark.id)
  end
  mark = nil
end

--- The extmark currently shown, as {buf, row, col, details} (tests and debugging).
function M.get()
  if not mark or not vim.api.nvim_buf_is_valid(mark.buf) then
    return nil
  end
  local m = vim.api.nvim_buf_get_extmark_by_id(mark.buf, M.ns, mark.id, { details = true })
  if not m or #m == 0 then
    return nil
  end
  return { buf = mark.buf, row = m[1], col = m[2], details = m[3] }
end

--- The displayed text of the ghost (tabs expanded, annotation excluded).
function M.displayed_text()
  local g = M.get()
  if not g then
    return nil
  end
  local parts = {}
  local first = {}
  for _, chunk in ipairs(g.details.virt_text or {}) do
    if chunk[2] == M.hl then
      first[#first + 1] = chunk[1]
    end
  end
  parts[1] = table.concat(first)
  for _, vl in ipairs(g.details.virt_lines or {}) do
    local l = {}
    for _, chunk in ipairs(vl) do
      if chunk[2] == M.hl then
        l[#l + 1] = chunk[1]
      end
    end
    parts[#parts + 1] = table.concat(l)
  end
  return table.concat(parts, "\n")
end

return M
