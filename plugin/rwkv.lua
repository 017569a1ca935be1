-- rwkv.nvim: user commands (defined before the Python host starts) and default setup.
-- Nothing heavy happens here: the model loads on the first InsertEnter.
if vim.g.loaded_rwkv then
  return
end
vim.g.loaded_rwkv = 1

if vim.fn.has("nvim-0.10") == 0 then
  vim.notify("rwkv.nvim needs Neovim 0.10 or newer (inline virtual text)", vim.log.levels.ERROR)
  return
end

local function rwkv()
  local m = require("rwkv")
  m.ensure_setup()
  return m
end

local cmd = vim.api.nvim_create_user_command
cmd("RwkvToggle", function()
  local on = rwkv().toggle()
  vim.notify("rwkv: suggestions " .. (on and "enabled" or "disabled"), vim.log.levels.INFO, { title = "rwkv" })
end, { desc = "rwkv: toggle suggestions" })
cmd("RwkvEnable", function()
  rwkv().enable()
end, { desc = "rwkv: enable suggestions" })
cmd("RwkvDisable", function()
  rwkv().disable()
end, { desc = "rwkv: disable suggestions" })
cmd("RwkvStatus", function()
  rwkv().show_status()
end, { desc = "rwkv: model, device, cache and last request" })
cmd("RwkvDownload", function(a)
  rwkv().download(a.args)
end, {
  nargs = 1,
  desc = "rwkv: download a model (g1-0.1b, g1-0.4b, g1-1.5b, g1-2.9b, g1-7.2b or a .pth file name)",
  complete = function()
    return { "g1-0.1b", "g1-0.4b", "g1-1.5b", "g1-2.9b", "g1-7.2b" }
  end,
})

cmd("RwkvBuild", function(a)
  require("rwkv.build").command(a.bang)
end, {
  bang = true,
  desc = "rwkv: create or repair the plugin's Python environment (! waits for it)",
})

-- setup() with defaults unless the user calls it from their config (checked after start-up).
if vim.v.vim_did_enter == 1 then
  vim.schedule(function()
    require("rwkv").ensure_setup()
  end)
else
  vim.api.nvim_create_autocmd("VimEnter", {
    once = true,
    desc = "rwkv: default setup",
    callback = function()
      require("rwkv").ensure_setup()
    end,
  })
end
