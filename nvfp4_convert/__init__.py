"""nvfp4-convert: rewrite a ModelOpt NVFP4 DeepSeek-V4 checkpoint into the hybrid that stock vLLM serves.

Modules, one concern each (read them in this order):

- ``errors``          the one exception type, naming file and tensor
- ``options``         the values of the CLI's options (policy presets, expert format, I/O mode, verify's limits):
                      importable without torch
- ``direct_io``       O_DIRECT file I/O: write-once files assembled from any-size writes, aligned reads, read-ahead
                      that takes from the page cache what is already there
- ``prefetch``        the source read into the page cache while ``run`` starts (torch import, planning)
- ``safetensors_io``  streaming safetensors: header parsing/validation, tensor views, shard writer
- ``checkpoint``      a source checkpoint on disk: index/shards, config, other files
- ``naming``          transformers <-> native DeepSeek names
- ``codecs``          pure numeric codecs: NVFP4 decode, FP8 ue8m0 block quantization, gate/up fold
- ``formats/``        one module per number format (NVFP4 16/32, FP8 block, FP8 per-tensor, MXFP4, dense):
                      recognise, validate, logical shape, decode row bands, encode (output formats)
- ``metrics``         error metrics of a decoded weight against a reference (below planning)
- ``inventory``       every source tensor classified into modules and roles (formats recognise them)
- ``model_shapes``    the tensors and shapes config.json implies; the source checked against them
- ``policy``          precision presets: which output format each module gets
- ``plan``            the full list of output tensors, their producers, shards, drops, ignored_layers
- ``execute``         runs a plan: streams tensors into atomically written shards
- ``state``           DST's lock, journal and plan fingerprint (resume), and its status
- ``convert``         the whole run in order: prepare, check DST, write shards, then metadata
- ``graft``           --attention-from: non-expert linears from a BF16/FP8 reference
- ``mtp``             --mtp-from: the whole MTP block from DeepSeek's release (FP8 + MXFP4) or a BF16 cast, experts re-encoded NVFP4
- ``config_emit``     config.json / hf_quant_config.json for stock vLLM
- ``report``          JSON + human summary of what happened to every input tensor
- ``inspect``         what a checkpoint (source or converted) contains
- ``verify``          checks a converted checkpoint against the contract, its source, a reference
- ``probe``           asks a served model a few questions: coherent or garbage?
- ``preflight/``      does the vLLM installed here compute our format right? (tiny model, vLLM vs transformers)
- ``cli``             the Typer/Rich command line (thin; imports the library, and torch, only in its commands)
"""

__version__ = "0.1.0"
