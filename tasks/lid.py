"""Language identification: fastText's `lid.176` (FineWeb's model), its compressed `.ftz` form
shipped in tasks/assets, so nothing is downloaded.

A module of its own, light to import: validating a `languages` parameter (every `crawl2model`
command builds the filter's parameters) reads the list of codes below and loads no model; the
model is loaded once per process, on the first document it reads."""

from __future__ import annotations

import functools
import os

LID_MODEL = os.path.join(os.path.dirname(__file__), "assets", "lid.176.ftz")

# The 176 ISO 639 codes `lid.176` names, in the model's order (tests/test_curation.py checks them
# against the model's labels).
LANGUAGES: tuple[str, ...] = tuple("""
    en ru de fr it ja es ceb tr pt uk eo pl sv nl he zh hu ar ca fi cs fa sr el vi bg ko no mk
    ro id th hy da ta hi hr sh be ka te kk war lt gl sk bn eu sl kn ml mr et az ms sq la bs nn
    ur lv my tt af oc nds ky ast tl is ia si gu km br ba uz bo pa vo als ne cy jbo fy mn lb ce
    ug tg sco sa cv jv min io or as new ga mg an ckb sw bar lmo yi arz mhr azb sah pnb su bpy
    pms ilo wuu ku ps ie xmf yue gom li mwl kw sd hsb scn gd pam bh mai vec mt dv wa mzn am qu
    eml cbk tk rm os vls yo lo lez so myv diq mrj dsb frr ht gn bxr kv sc nah krc bcl nap gv av
    rue xal pfl dty hif co lrc vep tyv
""".split())


@functools.cache
def lid_model():
    """The `lid.176` model, one per process."""
    from fasttext.FastText import _FastText  # not fasttext.load_model: it prints a warning

    return _FastText(LID_MODEL)


# The identifiers a filter can use: lid.176 (the default: 98.9% right on ../shared/data/langid at
# 5x the speed, benchmarks/bench_quality.py) and py3langid (langid.py's model, 97 languages).
IDENTIFIERS = ("lid.176", "py3langid")


@functools.cache
def py3langid_model():
    """py3langid's identifier with probabilities (not its default log-scores), one per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)


def top_language(text: str, max_chars: int = 20_000, identifier: str = "lid.176") -> tuple[str, float]:
    """The most likely language of `text` (its first `max_chars`) and its probability."""
    if identifier == "py3langid":
        lang, prob = py3langid_model().classify(text[:max_chars])
        return lang, min(float(prob), 1.0)
    labels, probs = lid_model().predict(text[:max_chars].replace("\n", " "), k=1)
    return labels[0].removeprefix("__label__"), min(float(probs[0]), 1.0)
