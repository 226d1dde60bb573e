"""The Axolotl binding: a thin layer over the core (plugin hooks, YAML schema, dataset strategies)."""
