"""Datasets: one in-memory form (records) and readers for every on-disk format."""

from tpas.data.datasets import EVAL_SPLITS, FORMATS, load_eval, load_train
from tpas.data.records import Behaviour, EvalSet, GalleryImage, ImageText, Query, TrainSet

__all__ = ["EVAL_SPLITS", "FORMATS", "Behaviour", "EvalSet", "GalleryImage", "ImageText", "Query", "TrainSet",
           "load_eval", "load_train"]
