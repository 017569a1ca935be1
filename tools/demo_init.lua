-- Minimal Neovim config used by `python3 tools/quickstart.py run`: the plugin from this
-- checkout, the virtualenv's Python host, the default model. Your own config is not read.
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h")
vim.opt.runtimepath:prepend(root)
vim.g.python3_host_prog = vim.env.RWKV_NVIM_PYTHON or (root .. "/.venv/bin/python")
vim.g.loaded_node_provider, vim.g.loaded_perl_provider, vim.g.loaded_ruby_provider = 0, 0, 0
vim.opt.number = true
vim.opt.expandtab = true
vim.opt.shiftwidth = 4
vim.opt.updatetime = 300
local ok, rwkv = pcall(require, "rwkv")
if ok then
  rwkv.setup({})
end
