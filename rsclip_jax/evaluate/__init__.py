"""Evaluation of CLIP models on remote-sensing benchmarks (see docs/evaluation.md).

* `suite`: the Python API (`Evaluator`, `run_tasks`, `discover`), also used by training;
* `tasks` + `registry`: the six tasks (zeroshot, linear_probe, knn, fewshot, retrieval, counting);
* `embeddings`: sharded, multi-host, cached embedding extraction (`Extractor`);
* `retrieval`, `zeroshot`, `linear_probe`, `knn`, `fewshot`, `counting`: the metrics;
* `datasets`: scene folders (8:2 split), Karpathy and counting JSONs, class names and templates;
* `report`, `plots`, `tsne`: JSON, Markdown tables and PNG plots; `paper`: the paper suite.
"""
