"""JSON Schemas of neardup's machine-readable outputs (`query --json`, `dups --json`, the HTTP API).

`query` scores are cosine similarities of unit vectors, in [-1, 1]; 1.0 means identical model input.
`dups` scores and thresholds are copy probabilities, in [0, 1] (neardup.calibration).
"""

_SCORE = {"type": "number", "minimum": -1.0001, "maximum": 1.0001}
_THRESHOLD = {"type": ["number", "null"]}
#: A `dups` link's score: the copy probability of its raw score (neardup.calibration)
_PAIR_SCORE = {"type": "number", "minimum": 0, "maximum": 1}
_DUPS_THRESHOLD = {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                   "description": "copy probability a pair needs to be linked (neardup.calibration)"}

QUERY = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup query --json",
    "type": "object",
    "required": ["threshold", "results"],
    "additionalProperties": False,
    "properties": {
        "threshold": _THRESHOLD,
        "score_name": {"enum": ["copy probability"],
                       "description": "the HTTP API only: what dups_score is"},
        "dups_threshold": {"type": "number", "description": "the HTTP API only: the default `dups` threshold"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["query", "matches"],
                "additionalProperties": False,
                "properties": {
                    "query": {"type": "string", "description": "the query image path as given"},
                    "matches": {
                        "type": "array",
                        "description": "sorted by score, highest first",
                        "items": {
                            "type": "object",
                            "required": ["path", "score"],
                            "additionalProperties": False,
                            "properties": {
                                "path": {"type": "string", "description": "absolute path"},
                                "score": _SCORE,
                                "id": {"type": "integer", "description": "catalog id (GET /api/images/{id})"},
                                "dups_score": {"type": ["number", "null"], "description": "the HTTP API only: the "
                                               "copy probability `dups` would link this pair by (0 under the "
                                               "cosine floor: never linked)"},
                                "copy": {"type": "boolean", "description": "the HTTP API only: dups_score reaches "
                                         "dups_threshold (`dups` would group the two)"},
                            },
                        },
                    },
                },
            },
        },
    },
}

DUPS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup dups --json",
    "type": "object",
    "required": ["threshold", "groups"],
    "additionalProperties": False,
    "properties": {
        "threshold": _DUPS_THRESHOLD,
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["files", "min_score", "max_score", "min_cosine", "max_cosine"],
                "additionalProperties": False,
                "properties": {
                    "files": {"type": "array", "minItems": 2, "items": {"type": "string", "description": "absolute path"}},
                    "min_score": {**_PAIR_SCORE, "description": "copy probability of the weakest verified "
                                  "link joining the group (what the threshold applies to)"},
                    "max_score": {**_PAIR_SCORE, "description": "copy probability of the strongest link in the group"},
                    "min_cosine": {**_SCORE, "description": "lowest plain cosine among the group's links"},
                    "max_cosine": {**_SCORE, "description": "highest plain cosine among the group's links"},
                },
            },
        },
    },
}

#: `dups --action ... --json` (the plan; a dry run's entries are all 'planned') and the manifest file an
#: applied action writes (neardup/actions.py); `neardup undo MANIFEST` reads it back.
MANIFEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup action manifest",
    "type": "object",
    "required": ["version", "id", "action", "index", "created", "keep", "keep_in", "to", "trash", "threshold",
                 "entries", "state"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": 1},
        "id": {"type": "string", "description": "run id; also the trash subfolder's name"},
        "action": {"enum": ["move", "hardlink", "delete"]},
        "index": {"type": "string", "description": "the index folder (absolute)"},
        "created": {"type": "string", "description": "ISO 8601 UTC time the plan was made"},
        "keep": {"type": "array", "items": {"enum": ["shape", "central", "pixels", "size", "oldest", "newest",
                                                     "shortest-path"]},
                 "description": "survivor criteria, in order"},
        "keep_in": {"type": "array", "items": {"type": "string"}, "description": "protected folders"},
        "to": {"type": ["string", "null"], "description": "--to folder of a move"},
        "trash": {"type": ["string", "null"], "description": "where delete/hardlink keep the replaced bytes"},
        "threshold": _THRESHOLD,
        "state": {"enum": ["planned", "applying", "applied", "interrupted", "undone", "partly-undone"],
                  "description": "partly-undone: an undo put back every entry it could; those still 'done' "
                                 "say why not in their reason (a re-run retries them)"},
        "warnings": {"type": "array", "items": {"type": "string"},
                     "description": "what the plan noticed, e.g. a --keep-in folder that holds no catalogued file"},
        "created_dirs": {"type": "array", "items": {"type": "string"},
                         "description": "folders the apply made (recorded before making them); a complete undo "
                                        "removes each that is still an empty folder"},
        "entries": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["group", "action", "source", "destination", "survivor", "sha256", "size",
                             "survivor_sha256", "status", "reason"],
                "additionalProperties": False,
                "properties": {
                    "group": {"type": "integer", "minimum": 1},
                    "action": {"enum": ["move", "hardlink", "delete"]},
                    "source": {"type": "string", "description": "the duplicate's path (absolute)"},
                    "destination": {"type": ["string", "null"],
                                    "description": "where the source's bytes go; null when skipped"},
                    "survivor": {"type": "string", "description": "the file kept in this group"},
                    "sha256": {"type": "string", "description": "the source's bytes, checked before and after"},
                    "size": {"type": "integer", "minimum": 0},
                    "survivor_sha256": {"type": "string"},
                    "status": {"enum": ["planned", "done", "skipped", "undone"]},
                    "reason": {"type": ["string", "null"],
                               "description": "why an entry was skipped; on an entry still 'done' after an undo, "
                                              "why it was not restored ('not restored: ...')"},
                },
            },
        },
    },
}

_IMAGE_PROPERTIES = {
    "id": {"type": "integer", "description": "catalog id"},
    "path": {"type": "string", "description": "absolute path"},
    "width": {"type": ["integer", "null"], "description": "pixels, after EXIF orientation"},
    "height": {"type": ["integer", "null"]},
    "bytes": {"type": "integer", "description": "file size when indexed"},
}

_IMAGE = {"type": "object", "required": list(_IMAGE_PROPERTIES), "additionalProperties": False,
          "properties": _IMAGE_PROPERTIES}

IMAGE = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "GET /api/images/{id}/info", **_IMAGE}

DUPS_PAGE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "GET /api/duplicates: one page of duplicate groups",
    "type": "object",
    "required": ["threshold", "page", "per_page", "pages", "total_groups", "total_files", "groups"],
    "additionalProperties": False,
    "properties": {
        "threshold": _DUPS_THRESHOLD,
        "page": {"type": "integer", "minimum": 1, "description": "1-based"},
        "per_page": {"type": "integer", "minimum": 1},
        "pages": {"type": "integer", "minimum": 0},
        "total_groups": {"type": "integer", "minimum": 0},
        "total_files": {"type": "integer", "minimum": 0, "description": "files in all groups"},
        "score_name": {"enum": ["copy probability"],
                       "description": "what min_score/max_score and the threshold are"},
        "max_threshold": {"type": "number", "description": "the highest threshold (1)"},
        "handled_hidden": {"type": "integer", "minimum": 0,
                           "description": "files left out because an applied run is done with them (handled=hide)"},
        "groups": {
            "type": "array",
            "description": "largest groups first, the same order as `dups`",
            "items": {
                "type": "object",
                "required": ["number", "min_score", "max_score", "min_cosine", "max_cosine", "images"],
                "additionalProperties": False,
                "properties": {
                    "number": {"type": "integer", "minimum": 1, "description": "position in the whole list"},
                    "min_score": {**_PAIR_SCORE, "description": "copy probability of the weakest verified "
                                  "link joining the group (as `dups --json`)"},
                    "max_score": {**_PAIR_SCORE, "description": "copy probability of the strongest link"},
                    "min_cosine": {**_SCORE, "description": "lowest plain cosine among the group's links"},
                    "max_cosine": {**_SCORE, "description": "highest plain cosine among the group's links"},
                    "images": {"type": "array", "minItems": 2, "items": _IMAGE},
                },
            },
        },
    },
}

COMPARE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "GET /api/compare?a=&b=",
    "type": "object",
    "required": ["score", "images"],
    "additionalProperties": False,
    "properties": {
        "score": {**_PAIR_SCORE, "description": "the copy probability `dups` would link the two by (0 under the "
                                                "cosine floor: never linked)"},
        "cosine": {**_SCORE, "description": "cosine of the two stored vectors"},
        "score_name": {"enum": ["copy probability"]},
        "dups_threshold": {"type": "number", "description": "the default `dups` threshold"},
        "images": {"type": "array", "minItems": 2, "maxItems": 2, "items": _IMAGE},
    },
}

ERROR = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "any HTTP API error (4xx/5xx)",
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {"type": "string", "description": "one line for the user"},
                   "field": {"type": "string", "description": "the request field the error concerns"}},
}

#: The Parquet shards written by `neardup index --ray` and read by `neardup merge` (neardup/shards.py
#: builds the Arrow schema from this table). One row per file seen; the file's key-value metadata holds
#: "neardup.shard" (the format version) and "neardup.model" (the JSON model identity of the vectors).
SHARD_VERSION = 1
SHARD_COLUMNS = {
    "path": ("string", False, "absolute path or URL of the file"),
    "size": ("int64", False, "bytes (0 when the file could not be read)"),
    "mtime_ns": ("int64", False, "modification time, ns since the epoch (0 when the file could not be read)"),
    "sha256": ("string", True, "hex digest of the bytes; null when the file could not be read"),
    "width": ("int32", True, "pixels, after EXIF orientation; null for failures"),
    "height": ("int32", True, "pixels, after EXIF orientation; null for failures"),
    "status": ("string", False, "'indexed' or 'failed'"),
    "error": ("string", True, "one-line reason when status is 'failed', else null"),
    "vector": ("float32[dim]", True, "unit vector (fixed-size list of the model's dim floats); null for failures"),
}

_RATE = {"type": "number", "exclusiveMinimum": 0, "description": "images per second"}
_GUARD = {
    "type": "object",
    "required": ["images", "mean_cosine", "min_cosine", "top1_changed", "min_mean_cosine", "passed"],
    "properties": {
        "images": {"type": "integer", "description": "guard images: photos and their edited copies"},
        "mean_cosine": {"type": "number", "description": "mean cosine of int8 vectors to their fp32 vectors"},
        "min_cosine": {"type": "number"},
        "top1_changed": {"type": "integer", "description": "copies whose nearest original differs from fp32's"},
        "min_mean_cosine": {"type": "number"},
        "passed": {"type": "boolean"},
        "calibration_images": {"type": "integer"},
    },
}
BENCH = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup bench --json",
    "type": "object",
    "required": ["machine", "images", "flops", "seed_style", "backends", "queries"],
    "additionalProperties": False,
    "properties": {
        "machine": {
            "type": "object",
            "required": ["cpu", "cores", "gpu", "python", "torch", "onnxruntime", "ort_providers"],
            "properties": {"cpu": {"type": "string"}, "cores": {"type": "integer"}, "gpu": {"type": ["string", "null"]},
                           "python": {"type": "string"}, "torch": {"type": "string"}, "onnxruntime": {"type": "string"},
                           "ort_providers": {"type": "array", "items": {"type": "string"}}},
        },
        "images": {
            "type": "object", "required": ["count", "source", "mean_megapixels"],
            "properties": {"count": {"type": "integer", "minimum": 1}, "source": {"type": "string"},
                           "mean_megapixels": {"type": "number"}},
        },
        "flops": {
            "type": "object", "required": ["macs_per_image", "sgemm_gflops", "threads", "bound_images_per_s"],
            "properties": {
                "macs_per_image": {"type": "integer", "description": "multiply-adds of one 224x224 image (convolutions)"},
                "sgemm_gflops": {"type": "number", "description": "measured float32 matmul rate, 2 flops per multiply-add"},
                "threads": {"type": "integer"},
                "bound_images_per_s": {**_RATE, "description": "sgemm_gflops / (2 * macs_per_image)"},
            },
        },
        "seed_style": {
            "type": "object", "required": ["images", "seconds", "images_per_s", "model_images_per_s"],
            "description": "torch eager, one image at a time, full-size decode, no overlap (the seed's predict loop)",
            "properties": {"images": {"type": "integer"}, "seconds": {"type": "number"}, "images_per_s": _RATE,
                           "model_images_per_s": {**_RATE, "description": "model time only"}},
        },
        "backends": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["backend", "available", "error"],
                "properties": {
                    "backend": {"enum": ["torch", "onnx", "onnx-int8", "openvino"]},
                    "available": {"type": "boolean"},
                    "error": {"type": ["string", "null"], "description": "why the backend cannot run here"},
                    "providers": {"type": "array", "items": {"type": "string"}},
                    "model_images_per_s": {**_RATE, "description": "preprocessed tensors through embed(), batches of 32"},
                    "model_ratio": {"type": "number", "description": "model_images_per_s / seed model_images_per_s"},
                    "model_fraction_of_bound": {"type": "number", "description": "model_images_per_s / bound_images_per_s"},
                    "index_images_per_s": {**_RATE, "description": "Index.add end to end: read, decode, embed, store"},
                    "index_ratio": {"type": "number", "description": "index_images_per_s / seed images_per_s"},
                    "index_cpu_ms_per_image": {"type": "number",
                                               "description": "CPU time of Index.add per image, all threads and "
                                                              "decode worker processes (ms)"},
                    "int8_guard": _GUARD,
                    "openvino_guard": {"type": "object", "description": "OpenVINO's guard report against fp32 ONNX "
                                                                        "(mean and worst cosine, hard cases)"},
                },
            },
        },
        "queries": {
            "type": ["object", "null"],
            "required": ["count", "index_size", "exact_ms", "lsh_ms", "lsh_recall_at_10"],
            "properties": {"count": {"type": "integer"}, "index_size": {"type": "integer"},
                           "exact_ms": {"type": "number", "description": "ms per Index.query_vector(exact=True)"},
                           "lsh_ms": {"type": "number", "description": "ms per Index.query_vector(exact=False)"},
                           "lsh_recall_at_10": {"type": "number", "description": "LSH top-10 ids found by exact top-10"}},
        },
    },
}

_METRICS = {
    "type": "object",
    "required": ["queries", "top1", "mAP", "micro_AP"],
    "description": "top1: share of queries whose best match is true; recall@k; mAP: mean AP@k; micro_AP: DISC21 pooled AP",
    "properties": {"queries": {"type": "integer", "minimum": 0}, "top1": {"type": "number", "minimum": 0, "maximum": 1},
                   "mAP": {"type": "number", "minimum": 0, "maximum": 1},
                   "micro_AP": {"type": "number", "minimum": 0, "maximum": 1}},
    "patternProperties": {"^recall@[0-9]+$": {"type": "number", "minimum": 0, "maximum": 1}},
}

#: truth.json of an evaluation set (`neardup eval build` writes one; an outside set in this format runs
#: with `neardup eval run`). Paths are relative to the folder holding truth.json.
EVAL_SET = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup evaluation set (truth.json)",
    "type": "object",
    "required": ["gallery", "queries"],
    "properties": {
        "version": {"type": "integer"},
        "name": {"type": "string"},
        "seed": {"type": ["integer", "null"], "description": "edit parameters were drawn with this seed"},
        "edits": {"type": "array", "items": {"type": "string"}},
        "missing": {"type": "array", "items": {"type": "string"}, "description": "sources the builder could not obtain"},
        "gallery": {
            "type": "array",
            "description": "what gets indexed: originals and distractors",
            "items": {
                "type": "object",
                "required": ["id", "path"],
                "properties": {
                    "id": {"type": "string", "minLength": 1},
                    "path": {"type": "string", "description": "relative to the set folder"},
                    "role": {"enum": ["original", "distractor"]},
                    "source": {"type": "string", "description": "where the pixels come from; tiles of one image share it"},
                    "licence": {"type": "string"},
                },
            },
        },
        "queries": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "path", "matches"],
                "properties": {
                    "id": {"type": "string", "minLength": 1},
                    "path": {"type": "string", "description": "relative to the set folder"},
                    "edit": {"type": "string", "description": "edit kind, for the per-kind table"},
                    "matches": {"type": "array", "items": {"type": "string"},
                                "description": "gallery ids this query is a copy of; empty: a query with no copy in the gallery"},
                    "params": {"type": "object", "description": "the drawn edit parameters"},
                },
            },
        },
    },
}

_CURVE = {"type": "object", "required": ["threshold", "precision", "recall"],
          "properties": {key: {"type": "array", "items": {"type": "number"}} for key in ("threshold", "precision", "recall")}}
_CALIBRATION = {"type": "object", "required": ["threshold", "precision", "recall", "target_precision"],
                "properties": {"threshold": {"type": ["number", "null"]}, "precision": {"type": ["number", "null"]},
                               "recall": {"type": "number"}, "target_precision": {"type": "number"}}}
_DUPS_RUN = {"type": "object",
             "required": ["threshold", "groups", "predicted_pairs", "correct_pairs", "true_pairs", "precision", "recall"],
             "properties": {"precision": {"type": "number", "minimum": 0, "maximum": 1},
                            "recall": {"type": "number", "minimum": 0, "maximum": 1},
                            "survivor_is_original": {
                                "type": ["number", "null"], "minimum": 0, "maximum": 1,
                                "description": "of the groups holding exactly one original, the fraction whose "
                                               "survivor under the default --keep is that original (or a "
                                               "byte-identical copy of it); null when no group holds one"},
                            "survivor_groups": {"type": "integer", "minimum": 0}}}
_METHOD = {
    "type": "object",
    "required": ["overall", "per_edit", "calibration", "pairs_curve"],
    "properties": {
        "overall": _METRICS,
        "per_edit": {"type": "object", "additionalProperties": _METRICS},
        "calibration": {**_CALIBRATION, "description": "lowest threshold whose dups groups keep pair precision >= target"},
        "pairs_curve": {**_CURVE, "description": "group-pair precision/recall as the threshold falls (thinned)"},
        "at_default_threshold": {"type": "object"},
        "lsh_search": _METRICS,
        "dups": {"type": "object", "properties": {"lsh": _DUPS_RUN, "exact": _DUPS_RUN}},
    },
}

#: `neardup eval run --json`.
EVAL_RESULT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "neardup eval run --json",
    "type": "object",
    "required": ["set", "k", "default_threshold", "gallery", "queries", "edits", "methods", "timings"],
    "properties": {
        "set": {"type": "string"},
        "k": {"type": "integer", "minimum": 1},
        "default_threshold": {"type": "number"},
        "gallery": {"type": "integer"}, "originals": {"type": "integer"}, "distractors": {"type": "integer"},
        "queries": {"type": "integer"},
        "unreadable": {"type": "array", "items": {"type": "string"}},
        "edits": {"type": "array", "items": {"type": "string"}},
        "methods": {"type": "object", "required": ["neardup"],
                    "properties": {"neardup": _METHOD, "seed_lsh": _METHOD, "phash": _METHOD}},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}

# ---- the actions API (`neardup serve --allow-actions`; neardup/web/actions_api.py) ----------------
# MANIFEST is referenced, not copied: the API answers with the very manifest the CLI prints and writes.

_ACTIONS = {"enum": ["move", "hardlink", "delete"]}

#: POST /api/actions/plan (body).
ACTION_PLAN_REQUEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "POST /api/actions/plan: what `dups --action` would do (reads only)",
    "type": "object",
    "required": ["action"],
    "additionalProperties": False,
    "properties": {
        "action": _ACTIONS,
        "to": {"type": ["string", "null"], "description": "move only: the folder to move into (absolute)"},
        "threshold": {"type": ["number", "null"], "minimum": 0.5, "maximum": 1,
                      "description": "groups at this copy probability threshold (default: the `dups` "
                                     "default, 0.97)"},
        "keep": {"type": "string", "description": "survivor criteria in order, comma-separated (GET /api/actions "
                                                  "lists them and the default)"},
        "keep_in": {"type": "array", "items": {"type": "string"},
                    "description": "protected folders (absolute, existing): preferred as survivors, never touched"},
        "exclude": {"type": "array", "items": {"type": "integer"},
                    "description": "catalog ids of files to leave out: their entries are 'skipped' with a reason"},
        "exclude_paths": {"type": "array", "items": {"type": "string"},
                          "description": "paths of files to leave out (as exclude; unknown paths are ignored)"},
    },
}

#: POST /api/actions/plan (answer): the plan, every entry 'planned' or 'skipped' with its reason.
ACTION_PLAN = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "POST /api/actions/plan: the plan",
    "type": "object",
    "required": ["plan_id", "manifest"],
    "additionalProperties": False,
    "properties": {
        "plan_id": {"type": "string", "description": "what /api/actions/apply takes; also the run id once applied"},
        "manifest": MANIFEST,
        "notes": {"type": "array", "description": "what the user should know, in plain words", "items": {
            "type": "object", "required": ["field", "level", "message"], "additionalProperties": False,
            "properties": {"field": {"type": ["string", "null"], "description": "the request field it concerns"},
                           "level": {"enum": ["info", "warning", "error"]}, "message": {"type": "string"}}}},
    },
}

#: POST /api/actions/apply (body).
ACTION_APPLY_REQUEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "POST /api/actions/apply",
    "type": "object",
    "required": ["plan_id", "confirm"],
    "additionalProperties": False,
    "properties": {"plan_id": {"type": "string"}, "confirm": {"const": True}},
}

#: POST /api/actions/undo (body).
ACTION_UNDO_REQUEST = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "POST /api/actions/undo",
    "type": "object",
    "required": ["run_id"],
    "additionalProperties": False,
    "properties": {"run_id": {"type": "string", "description": "a run listed by GET /api/actions"}},
}

#: POST /api/actions/apply and /api/actions/undo (answer): the run's manifest after the step.
ACTION_RUN = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "POST /api/actions/apply or /undo: the run",
    "type": "object",
    "required": ["run_id", "manifest_path", "manifest"],
    "additionalProperties": False,
    "properties": {
        "run_id": {"type": "string"},
        "manifest_path": {"type": "string", "description": "<index>/actions/<run id>.json; `neardup undo` takes it"},
        "manifest": MANIFEST,
    },
}

#: GET /api/actions.
ACTION_RUNS = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "GET /api/actions: past runs, newest first",
    "type": "object",
    "required": ["enabled", "runs"],
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean", "description": "whether the server was started with --allow-actions"},
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["run_id", "action", "created", "state", "counts", "manifest_path"],
                "additionalProperties": False,
                "properties": {
                    "run_id": {"type": "string"},
                    "action": _ACTIONS,
                    "created": {"type": "string", "description": "ISO 8601 UTC time the plan was made"},
                    "state": {"enum": ["planned", "applying", "applied", "interrupted", "undone", "partly-undone"]},
                    "counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                               "description": "entries per status (planned, done, skipped, undone)"},
                    "manifest_path": {"type": "string"},
                    "to": {"type": ["string", "null"], "description": "move runs: the folder moved into"},
                },
            },
        },
        "keep_criteria": {"type": "array", "items": {"type": "string"},
                          "description": "the survivor criteria `keep` takes"},
        "default_keep": {"type": "string", "description": "the default survivor policy"},
    },
}
