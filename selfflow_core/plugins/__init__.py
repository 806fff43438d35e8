"""The plugin system: the hook specifications, the typed registries and the plugin manager."""
