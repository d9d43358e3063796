"""A Triton Inference Server model repository for a grinfer checkpoint (`grinfer export triton-repo`).

    preprocess_py -> embedding_service -> gr_model -> interaction_python, chained by ensemble_model.

`writer.write_repository` lays it out; the Python-backend models (`preprocess`, `embedding`, `gr_model`,
`interaction`) run inside tritonserver's Python backend, which must be able to import grinfer and torch.
"""
