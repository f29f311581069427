"""Remote-sensing applications built on the model and the evaluator: tiled zero-shot mapping of
whole scenes (`mapping`), a text-and-image search index over an archive (`index`, `search`), and
a local web page over an index (`serve`). They sit beside `train` in the layering: they use the
model library, `raster`, `data` and `evaluate`, never the trainer."""
