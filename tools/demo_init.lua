-- Minimal Neovim config used by `python3 tools/quickstart.py run`: the plugin from this
-- checkout, the default model, and the plugin's own Python host started from the quick
-- start's virtualenv (the same mechanism as :RwkvBuild; no :UpdateRemotePlugins, no
-- manifest). Your own config is not read.
local root = vim.fn.fnamemodify(debug.getinfo(1, "S").source:sub(2), ":p:h:h")
vim.opt.runtimepath:prepend(root)
vim.g.loaded_node_provider, vim.g.loaded_perl_provider, vim.g.loaded_ruby_provider = 0, 0, 0
vim.opt.number = true
vim.opt.expandtab = true
vim.opt.shiftwidth = 4
vim.opt.updatetime = 300
local ok, rwkv = pcall(require, "rwkv")
if ok then
  rwkv.setup({
    python = { env = vim.env.RWKV_NVIM_VENV or (root .. "/.venv"), host = "own" },
  })
end
