-- rwkv.nvim: insert-mode keys. Each key acts only while a suggestion shows; otherwise it
-- does what it did before: the user's own insert-mode mapping (captured with maparg()
-- before we map, e.g. nvim-cmp's <Tab>) or the key itself (a literal tab, 'expandtab').
-- Every action also exists as a <Plug> mapping, e.g. <Plug>(rwkv-accept).
local M = {}

local PLUG = {
  accept = "<Plug>(rwkv-accept)",
  accept_line = "<Plug>(rwkv-accept-line)",
  accept_word = "<Plug>(rwkv-accept-word)",
  dismiss = "<Plug>(rwkv-dismiss)",
  next = "<Plug>(rwkv-next)",
  prev = "<Plug>(rwkv-prev)",
  trigger = "<Plug>(rwkv-trigger)",
}
M.PLUG = PLUG

local ACTION = {
  accept = "<C-g>u<Cmd>lua require('rwkv.suggest').accept('all')<CR>",
  accept_line = "<C-g>u<Cmd>lua require('rwkv.suggest').accept('line')<CR>",
  accept_word = "<C-g>u<Cmd>lua require('rwkv.suggest').accept('word')<CR>",
  dismiss = "<Cmd>lua require('rwkv.suggest').dismiss()<CR>",
  next = "<Cmd>lua require('rwkv.suggest').cycle(1)<CR>",
  prev = "<Cmd>lua require('rwkv.suggest').cycle(-1)<CR>",
  trigger = "<Cmd>lua require('rwkv.suggest').trigger()<CR>",
}

local DESC = "rwkv: "

-- lhs -> {orig = maparg dict or nil, fallback = <Plug> lhs or nil}
local mapped = {}

local function plug_pick(n)
  return ("<Plug>(rwkv-pick-%d)"):format(n)
end

local function fallback_name(lhs)
  return "<Plug>(rwkv-fallback-" .. lhs:gsub("[<>]", "") .. ")"
end

--- Copy the user's existing global insert mapping of `lhs` to a <Plug> key we can return.
local function capture(lhs)
  local orig = vim.fn.maparg(lhs, "i", false, true)
  if vim.tbl_isempty(orig) or orig.buffer == 1 or (orig.desc or ""):sub(1, #DESC) == DESC then
    return nil, nil
  end
  local plug = fallback_name(lhs)
  vim.keymap.set("i", plug, orig.callback or orig.rhs or "", {
    expr = orig.expr == 1,
    remap = orig.noremap ~= 1,
    silent = orig.silent == 1,
    nowait = orig.nowait == 1,
    replace_keycodes = orig.expr == 1 and orig.replace_keycodes == 1 or nil,
    desc = "rwkv fallback: " .. (orig.desc or orig.rhs or lhs),
  })
  return orig, plug
end

--- Map `lhs` to `action_plug` while a suggestion shows, else to the fallback.
local function map_key(lhs, action_plug, name)
  local orig, fallback = capture(lhs)
  mapped[lhs] = { orig = orig, fallback = fallback }
  local suggest = require("rwkv.suggest")
  vim.keymap.set("i", lhs, function()
    if suggest.visible() then
      return action_plug
    end
    return fallback or lhs -- the key itself: its first key is not remapped (see :h recursive_mapping)
  end, { expr = true, remap = true, silent = true, replace_keycodes = true, desc = DESC .. name })
end

--- Remove our mappings and restore the ones they replaced.
function M.clear()
  for lhs, m in pairs(mapped) do
    if m.fallback then
      pcall(vim.keymap.del, "i", m.fallback)
    end
    -- only undo what is still ours: a mapping made after setup() belongs to the user
    local now = vim.fn.maparg(lhs, "i", false, true)
    local ours = not vim.tbl_isempty(now) and now.buffer ~= 1 and (now.desc or ""):sub(1, #DESC) == DESC
    if ours then
      pcall(vim.keymap.del, "i", lhs)
    end
    if ours and m.orig then
      local ok = pcall(vim.fn.mapset, "i", false, m.orig)
      if not ok then
        vim.keymap.set("i", lhs, m.orig.callback or m.orig.rhs, {
          expr = m.orig.expr == 1,
          remap = m.orig.noremap ~= 1,
          silent = m.orig.silent == 1,
        })
      end
    end
  end
  mapped = {}
end

--- (Re)define the mappings from `keys` (config.keymaps).
---@param keys rwkv.Keymaps
function M.setup(keys)
  M.clear()
  for name, plug in pairs(PLUG) do
    vim.keymap.set("i", plug, ACTION[name], { silent = true, desc = DESC .. name })
  end
  for n = 1, 9 do
    vim.keymap.set("i", plug_pick(n), ("<C-g>u<Cmd>lua require('rwkv.suggest').accept('all', %d)<CR>"):format(n),
      { silent = true, desc = DESC .. "pick " .. n })
  end
  for name, plug in pairs(PLUG) do
    local lhs = keys[name]
    if lhs then
      if name == "trigger" then
        local orig = vim.fn.maparg(lhs, "i", false, true)
        local keep = not vim.tbl_isempty(orig) and orig.buffer ~= 1 and (orig.desc or ""):sub(1, #DESC) ~= DESC
        mapped[lhs] = { orig = keep and orig or nil }
        vim.keymap.set("i", lhs, plug, { remap = true, silent = true, desc = DESC .. name })
      else
        map_key(lhs, plug, name)
      end
    end
  end
  if keys.pick then
    for n = 1, 9 do
      map_key(keys.pick:format(n), plug_pick(n), "pick " .. n)
    end
  end
end

--- The keys currently mapped (lhs list), for :RwkvStatus and tests.
function M.mapped()
  return vim.tbl_keys(mapped)
end

return M
