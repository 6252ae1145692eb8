"""Applications built on the library: what ``src/evaluate.py``, ``src/predict.py``,
``scripts/model_zoo_row.py`` and ``scripts/hub_folder.py`` run.

They share one way to load a model for inference (:mod:`semseg.apps.common`), the library's one
prediction loop (:func:`semseg.evaluation.predict_batches`) and the datasets' image decoder.
"""
