-- The editor-side options of setup(): the one schema behind their defaults and checks
-- (lua/rwkv/config.lua) and their help (doc/rwkv.txt, written by tools/gen_config.py).
-- Engine options have their own schema (EngineConfig, generated into rwkv.engine_options).
--
-- Pure data, no require() and no vim.*: tools/gen_config.py loads this file alone with
-- `nvim -l` and reads it as JSON. Options are listed in help order; an option is either
--   a group: name, doc (optional), fields = { options... }   (a table of named options)
-- or a value:
--   name, doc (help text; |tags| and `code` as in help files),
--   type      "boolean" | "number" | "string" | "table", or several joined by "|";
--             "false" stands for the value false alone (a key that can be turned off)
--   default   the value; `optional = true` instead when the default is nil
--   min, max  inclusive range of a number;  integer = true: whole numbers only
--   choices   the strings allowed
--   contains  a string value must contain this text;  nonempty = true: must not be ""
--   items     "string": a table value must be a list of non-empty strings
--   map_of    a table value maps any key to values of this type (filetypes)
--   must      the message for a value that breaks contains/nonempty/items
--             ("<name> must ..."); config.lua words the min/max, integer and choices ones.
-- An option with no fields and type "table" takes any table (engine: checked against
-- rwkv.engine_options by config.lua).

local NOT_EMPTY = "must not be empty (nil uses the default)"
local KEY_MUST = "must be a key or false (not an empty string)"

return {
  { name = "enabled", type = "boolean", default = true,
    doc = "Suggestions on at start (|:RwkvToggle| flips it)." },
  { name = "auto_trigger", type = "boolean", default = true,
    doc = "Suggest while typing. `false`: only on the `trigger` key." },
  { name = "debounce_ms", type = "number", default = 75, min = 0, max = 10000,
    doc = "Milliseconds to wait after the last keystroke or cursor move before asking the engine." },
  { name = "filetypes", type = "table", map_of = "boolean",
    default = { ["*"] = true, gitcommit = false, gitrebase = false, help = false, hgcommit = false,
      svn = false, cvs = false },
    doc = "Per filetype on/off; \"*\" is used for filetypes not listed. Your table is merged over "
      .. "the default one. Buffers with a special 'buftype' (help, terminal, prompt, nofile, "
      .. "quickfix) never get suggestions, nor do 'nomodifiable' or 'readonly' buffers." },
  { name = "notify", type = "boolean", default = true,
    doc = "Notices when the model loads and is ready. Errors and warnings (CPU fallback, unusable "
      .. "disk cache, slower kernel) are always shown, each once; |:RwkvStatus| lists them again." },
  { name = "debug", type = "boolean", default = false,
    doc = "Log every request and context chunk (that is, BUFFER TEXT) to `stdpath(\"log\")/rwkv.log` "
      .. "(mode 0600). Off: buffer text is never written to any log. Note that "
      .. "$NVIM_PYTHON_LOG_LEVEL=DEBUG makes pynvim itself log all RPC traffic, whatever this "
      .. "option says." },
  { name = "ghost", fields = {
    { name = "enabled", type = "boolean", default = true,
      doc = "The suggestion as ghost text at the cursor. `false`: none (e.g. when a completion menu "
        .. "shows the candidates, |rwkv-lsp|); the float still shows two or more candidates, and "
        .. "the keys act only while it does." },
    { name = "annotation", type = "boolean", default = true,
      doc = "Show \"(i/n)\" after the ghost text when there are several candidates and the float "
        .. "is off." },
    { name = "max_lines", type = "number", integer = true, default = 3, min = 0, max = 100,
      doc = "Most lines of ghost text: the first at the cursor, the others as virtual lines below "
        .. "it, so that the buffer does not jump by a long candidate's height at every suggestion "
        .. "while typing; \"… +N lines\" says how many are cut (the float lists them, <Tab> "
        .. "inserts them). No limit when 0." },
  } },
  { name = "float", fields = {
    { name = "enabled", type = "boolean", default = true,
      doc = "The candidate window, shown when there are two or more candidates. It never takes "
        .. "the focus, sits below the cursor line and the ghost text when there is room (else "
        .. "above the cursor line; never over it), so the code above the cursor stays readable, "
        .. "and closes on accept, dismiss, |InsertLeave|, |BufLeave| and |WinLeave|. One at most." },
    { name = "max_lines", type = "number", integer = true, default = 3, min = 1, max = 50,
      doc = "Lines shown per candidate." },
    { name = "max_width", type = "number", integer = true, default = 80, min = 10, max = 500,
      doc = "Window width limit in columns." },
    { name = "border", type = "string|table", default = "rounded",
      doc = "A border of |nvim_open_win()|: \"none\", \"single\", \"double\", \"rounded\", \"solid\", "
        .. "\"shadow\" or a list." },
  } },
  { name = "keymaps", doc = "Insert-mode keys (|rwkv-keys|); `false` leaves a key unmapped.", fields = {
    { name = "accept", type = "string|false", default = "<Tab>", nonempty = true,
      must = KEY_MUST,
      doc = "Accept the whole suggestion (|rwkv-accept|)." },
    { name = "accept_line", type = "string|false", default = "<S-Tab>", nonempty = true,
      must = KEY_MUST,
      doc = "Accept one line (|rwkv-accept-line|)." },
    { name = "accept_word", type = "string|false", default = "<C-Right>", nonempty = true,
      must = KEY_MUST,
      doc = "Accept one word (|rwkv-accept-word|)." },
    { name = "dismiss", type = "string|false", default = "<C-]>", nonempty = true,
      must = KEY_MUST,
      doc = "Hide the suggestion here (|rwkv-dismiss|)." },
    { name = "next", type = "string|false", default = "<M-]>", nonempty = true,
      must = KEY_MUST,
      doc = "Next candidate (|rwkv-next|)." },
    { name = "prev", type = "string|false", default = "<M-[>", nonempty = true,
      must = KEY_MUST,
      doc = "Previous candidate (|rwkv-prev|)." },
    { name = "trigger", type = "string|false", default = "<M-\\>", nonempty = true,
      must = KEY_MUST,
      doc = "Ask for a suggestion now, even with text right of the cursor (|rwkv-trigger|)." },
    { name = "pick", type = "string|false", default = "<M-%d>", contains = "%d",
      must = "must contain %d (e.g. \"<M-%d>\") or be false",
      doc = "Accept candidate N of the list: a format with %d, mapped for N = 1..9 (|rwkv-pick|)." },
  } },
  { name = "context", fields = {
    { name = "yank", type = "boolean", default = true,
      doc = "Yanked text (3 or more lines) becomes extra context." },
    { name = "buf_enter", type = "boolean", default = true,
      doc = "The lines around the cursor when you enter or leave a buffer become extra context." },
    { name = "save", type = "boolean", default = true,
      doc = "The lines around the cursor on |:write| too." },
    { name = "prime_on_idle", type = "boolean", default = true,
      doc = "On |CursorHold| / |CursorHoldI| ('updatetime') the engine computes the state of a "
        .. "queued context chunk, so that the next suggestion starts warm." },
  } },
  { name = "python", doc = "Where the Python side runs (|rwkv-install|).", fields = {
    { name = "host", type = "string", default = "auto", choices = { "auto", "own", "manifest" },
      nonempty = true, must = NOT_EMPTY,
      doc = "\"auto\": the plugin's own host when its environment exists (or `env` is set), else "
        .. "Neovim's python3 host through the rplugin manifest. \"own\" or \"manifest\" forces one "
        .. "(|rwkv-host|)." },
    { name = "interpreter", type = "string", default = "python3", nonempty = true, must = NOT_EMPTY,
      doc = "The Python that |:RwkvBuild| creates the environment with (3.9 or newer, with its "
        .. "venv module)." },
    { name = "env", type = "string", optional = true, nonempty = true, must = NOT_EMPTY,
      doc = "The environment's directory; nil: `stdpath(\"data\")/rwkv.nvim/venv`." },
    { name = "torch_spec", type = "string", optional = true, nonempty = true, must = NOT_EMPTY,
      doc = "The torch requirement the build installs; nil: `$TORCH_SPEC`, else \"torch==2.13.0\"." },
    { name = "torch_index_url", type = "string", optional = true, nonempty = true, must = NOT_EMPTY,
      doc = "An extra package index for torch, e.g. \"https://download.pytorch.org/whl/cu124\" "
        .. "(CUDA) or \".../rocm6.2\" (ROCm); nil: `$TORCH_INDEX_URL`." },
  } },
  { name = "lsp", doc = "The in-process language server (|rwkv-lsp|).", fields = {
    { name = "enabled", type = "boolean", default = false,
      doc = "`true`: attach it to the buffers that get suggestions, so completion menus list the "
        .. "candidates." },
    { name = "trigger_characters", type = "boolean|table", default = true, items = "string",
      must = "must be true, false or a list of non-empty strings",
      doc = "The completion trigger characters it announces (the characters after which Neovim's "
        .. "own |lsp-autocompletion| asks): `true` every printable ASCII character and space, a "
        .. "list of strings, or `false` none." },
  } },
  { name = "engine", type = "table", default = {},
    doc = "Options of the Python engine, below (|rwkv-engine-options|). Only the keys you set are "
      .. "passed; the others keep the engine's defaults." },
}
