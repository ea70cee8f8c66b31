"""Models: loading (local folders, hub ids, the embedded SmolLM2), their blocks, parameters, and
layer sets with the CogSym rule. Imports only `core`."""
