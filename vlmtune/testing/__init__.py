"""The embedded tiny models: a test fixture, and the default model when none is given. Below model loading."""
