-- Test init for headless Neovim (tests/support/nvim_harness.py): the repository on the
-- runtimepath, nothing from the user's config, the Python host = the test interpreter.
-- RWKV_TEST_OPTS (JSON, optional) is passed to require("rwkv").setup().
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h:h")   -- <root>/tests/support/nvim_init.lua
vim.opt.runtimepath:prepend(root)
vim.opt.swapfile = false
vim.opt.shadafile = "NONE"
vim.opt.more = false
vim.opt.shortmess:append("I")
if vim.env.RWKV_TEST_PYTHON and vim.env.RWKV_TEST_PYTHON ~= "" then
  vim.g.python3_host_prog = vim.env.RWKV_TEST_PYTHON
end
if vim.env.RWKV_TEST_OPTS and vim.env.RWKV_TEST_OPTS ~= "" then
  require("rwkv").setup(vim.json.decode(vim.env.RWKV_TEST_OPTS, { luanil = { object = true, array = true } }))
end
