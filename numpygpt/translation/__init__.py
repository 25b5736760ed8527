"""Translation between numbers in words and in digits: the encoder-decoder's task
(data in ``numbers``, the training recipe in ``recipe``)."""

from .numbers import NumberPairs, NumberTokenizer, sample_numbers, words
from .recipe import (TranslationObjective, TranslationOptions, add_translation_args, exact_match, run_translation,
                     train_translation)

__all__ = ["NumberPairs", "NumberTokenizer", "sample_numbers", "words", "TranslationObjective",
           "TranslationOptions", "add_translation_args", "exact_match", "run_translation", "train_translation"]
