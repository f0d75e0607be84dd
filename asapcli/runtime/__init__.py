"""A model that answers: presets and loading, inputs, generation with the engine's block, streaming, chat."""
