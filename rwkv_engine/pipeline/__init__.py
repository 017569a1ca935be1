"""From a completion request to ranked candidates (imports core, never cli)."""
