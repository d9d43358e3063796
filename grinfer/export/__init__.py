"""Export: the uncached ranking / retrieval forwards to standard ONNX and AOTInductor, the cached MTGR step to
AOTInductor, each verified against eager; runtime wrappers that load and run them (never needed to serve).

    forward.py, step.py, attention.py   the exportable modules (padded tensors, no data-dependent control flow)
    artifacts.py                        per graph: inputs, named dynamic axes, example, check batches
    onnx_export.py, aoti_export.py      the two writers; export.py drives them, verifies, writes goldens
    onnx_runtime.py, aoti_runtime.py    loaded exports behind one interface (runtime.ExportedModel)
"""
