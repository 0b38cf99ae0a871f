"""Readers for ScanRefer, ScanQA and SQA3D files."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ScanNetDataError
from .scene import find_scene_dir, read_json

__all__ = [
    "ReferRecord",
    "QARecord",
    "SQARecord",
    "load_scanrefer",
    "load_scanqa",
    "load_sqa3d",
    "scene_label_counts",
    "read_label_map",
]

LabelMap = Mapping[str, str] | Callable[[str], str]


def _map_label(label: str, label_map: LabelMap | None) -> str:
    if label_map is None:
        return label
    if callable(label_map):
        return label_map(label)
    return label_map.get(label, label)


def read_label_map(
    path: str | Path, source: str = "raw_category", target: str = "nyu40class"
) -> dict[str, str]:
    """Read ScanNet's ``scannetv2-labels.combined.tsv`` as ``{raw label: class}``.

    ScanRefer's unique/multiple split counts NYU40 classes, not raw labels: pass the result
    as ``label_map`` to :func:`load_scanrefer` to reproduce it exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanNetDataError(path, "file not found (expected scannetv2-labels.combined.tsv)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if (
            not reader.fieldnames
            or source not in reader.fieldnames
            or target not in (reader.fieldnames)
        ):
            raise ScanNetDataError(
                path, f"expected tab-separated columns {source!r} and {target!r}"
            )
        return {row[source]: row[target] for row in reader if row.get(source)}


logger = logging.getLogger(__name__)


@dataclass
class ReferRecord:
    """One ScanRefer referring expression.

    ``unique``: the target's class label occurs once in the scene (ScanRefer's "unique" split),
    else "multiple".
    """

    scene_id: str
    object_id: int
    object_name: str
    ann_id: int
    description: str
    unique: bool
    token: list[str] = field(default_factory=list)

    @property
    def eval_type(self) -> str:
        return "unique" if self.unique else "multiple"


@dataclass
class QARecord:
    """One ScanQA question (``answers`` / ``object_ids`` empty in the test split)."""

    scene_id: str
    question_id: str
    question: str
    answers: list[str] = field(default_factory=list)
    object_ids: list[int] = field(default_factory=list)
    object_names: list[str] = field(default_factory=list)


@dataclass
class SQARecord:
    """One SQA3D situated question (``answers`` empty without an annotations file)."""

    scene_id: str
    question_id: int | str
    question: str
    situation: str
    answers: list[str] = field(default_factory=list)
    alternative_situation: list[str] = field(default_factory=list)
    position: dict[str, float] | None = None
    rotation: dict[str, float] | None = None
    question_type: str | None = None


def _records(path: Path, data: Any, key: str | None, what: str) -> list[dict]:
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ScanNetDataError(path, f"expected an object with a {key!r} list ({what})")
        data = data[key]
    if not isinstance(data, list):
        raise ScanNetDataError(path, f"expected a JSON list of records ({what})")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ScanNetDataError(path, f"record {i} is not an object ({what})")
    return data


def _get(path: Path, rec: dict, i: int, key: str, kind: type | tuple[type, ...]) -> Any:
    """``rec[key]``, checked to be of ``kind`` (``True`` / ``False`` are not integers here)."""
    if key not in rec:
        raise ScanNetDataError(path, f"record {i} lacks {key!r}")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ScanNetDataError(
            path, f"record {i}: {key!r} must be {want}, got {type(value).__name__}"
        )
    return value


def _as_int(path: Path, rec: dict, i: int, key: str) -> int:
    value = _get(path, rec, i, key, (int, str))
    try:
        return int(value)
    except ValueError as e:
        raise ScanNetDataError(
            path, f"record {i}: {key!r} must be an integer, got {value!r}"
        ) from e


def scene_label_counts(
    scene_id: str, scannet_root: str | Path, label_map: LabelMap | None = None
) -> dict[int, int]:
    """``object_id -> number of instances in the scene sharing that object's label``.

    Reads only the scene's ``aggregation.json`` (cheap, no mesh).  ``label_map`` maps raw
    labels to the classes that are counted (default: raw labels).
    """
    scene_dir = find_scene_dir(scannet_root, scene_id, "raw scene folder")
    path = scene_dir / f"{scene_id}.aggregation.json"
    groups = read_json(path, "an aggregation.json with 'segGroups'")
    groups = groups.get("segGroups") if isinstance(groups, dict) else None
    if not isinstance(groups, list):
        raise ScanNetDataError(path, "expected an object with a 'segGroups' list")
    labels: dict[int, str] = {}
    for g in groups:
        if isinstance(g, dict) and isinstance(g.get("label"), str):
            labels[int(g.get("objectId", g.get("id", -1)))] = _map_label(
                g["label"].strip(), label_map
            )
    per_label: dict[str, int] = {}
    for lab in labels.values():
        per_label[lab] = per_label.get(lab, 0) + 1
    return {oid: per_label[lab] for oid, lab in labels.items()}


def _explicit_unique(rec: dict) -> bool | None:
    for key in ("unique", "is_unique"):
        if isinstance(rec.get(key), bool):
            return rec[key]
    for key in ("eval_type", "split_type"):
        value = rec.get(key)
        if value in ("unique", "multiple"):
            return value == "unique"
    return None


def load_scanrefer(
    path: str | Path,
    scannet_root: str | Path | None = None,
    *,
    scene_ids: set[str] | None = None,
    label_counts: Mapping[str, Mapping[int, int]] | None = None,
    label_map: LabelMap | None = None,
) -> list[ReferRecord]:
    """Read a ScanRefer JSON (list of ``{scene_id, object_id, object_name, ann_id,
    description, token}``).

    ``unique`` comes, in order of preference, from an explicit field in the record
    (``unique`` / ``is_unique`` bool or ``eval_type`` "unique"/"multiple"), from
    ``label_counts[scene_id][object_id]`` or from the scene's ``aggregation.json`` under
    ``scannet_root`` (the object's label, mapped by ``label_map`` if given, e.g. from
    :func:`read_label_map`, occurs once among the scene's instances), else
    (a warning is logged) from the file itself: the object's name is the only one of its kind
    among the objects the file refers to in that scene.  ``scene_ids`` keeps only those scenes.
    """
    path = Path(path)
    recs = _records(path, read_json(path, "ScanRefer records"), None, "ScanRefer")
    out: list[ReferRecord] = []
    pending: list[int] = []
    counts_cache: dict[str, dict[int, int]] = {}
    for i, rec in enumerate(recs):
        scene_id = _get(path, rec, i, "scene_id", str)
        if scene_ids is not None and scene_id not in scene_ids:
            continue
        object_id = _as_int(path, rec, i, "object_id")
        object_name = _get(path, rec, i, "object_name", str)
        ann_id = _as_int(path, rec, i, "ann_id") if "ann_id" in rec else 0
        description = _get(path, rec, i, "description", str)
        token = rec.get("token", [])
        token = [str(t) for t in token] if isinstance(token, list) else []
        unique = _explicit_unique(rec)
        if unique is None:
            counts = None
            if label_counts is not None and scene_id in label_counts:
                counts = label_counts[scene_id]
            elif scannet_root is not None:
                if scene_id not in counts_cache:
                    counts_cache[scene_id] = scene_label_counts(scene_id, scannet_root, label_map)
                counts = counts_cache[scene_id]
            if counts is not None:
                if object_id not in counts:
                    raise ScanNetDataError(
                        path,
                        f"record {i}: object_id {object_id} is not an object of {scene_id}",
                    )
                unique = counts[object_id] == 1
        if unique is None:
            pending.append(len(out))
            unique = True
        out.append(
            ReferRecord(scene_id, object_id, object_name, ann_id, description, unique, token)
        )
    if pending:
        logger.warning(
            "%s: %d record(s) without a unique/multiple field and no scannet_root; "
            "deciding from the objects the file itself refers to",
            path,
            len(pending),
        )
        names: dict[tuple[str, str], set[int]] = {}
        for r in out:
            names.setdefault((r.scene_id, r.object_name), set()).add(r.object_id)
        for j in pending:
            r = out[j]
            r.unique = len(names[(r.scene_id, r.object_name)]) == 1
    return out


def load_scanqa(path: str | Path, *, scene_ids: set[str] | None = None) -> list[QARecord]:
    """Read a ScanQA JSON (list of ``{scene_id, question_id, question, answers, object_ids,
    object_names}``; the test split has no answers / objects)."""
    path = Path(path)
    recs = _records(path, read_json(path, "ScanQA records"), None, "ScanQA")
    out: list[QARecord] = []
    for i, rec in enumerate(recs):
        scene_id = _get(path, rec, i, "scene_id", str)
        if scene_ids is not None and scene_id not in scene_ids:
            continue
        qid = _get(path, rec, i, "question_id", (str, int))
        question = _get(path, rec, i, "question", str)
        answers = rec.get("answers", [])
        object_ids = rec.get("object_ids", [])
        object_names = rec.get("object_names", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ScanNetDataError(path, f"record {i}: 'answers' must be a list of strings")
        if not isinstance(object_ids, list):
            raise ScanNetDataError(path, f"record {i}: 'object_ids' must be a list")
        try:
            object_ids = [int(o) for o in object_ids]
        except (TypeError, ValueError) as e:
            raise ScanNetDataError(path, f"record {i}: 'object_ids' must be integers") from e
        if not isinstance(object_names, list):
            raise ScanNetDataError(path, f"record {i}: 'object_names' must be a list")
        out.append(
            QARecord(
                scene_id, str(qid), question, answers, object_ids, [str(n) for n in object_names]
            )
        )
    return out


def load_sqa3d(
    questions_path: str | Path,
    annotations_path: str | Path | None = None,
    *,
    scene_ids: set[str] | None = None,
) -> list[SQARecord]:
    """Read SQA3D: questions ``{questions: [{scene_id, question_id, question, situation}]}``
    and optional annotations ``{annotations: [{question_id, answers: [{answer}]}]}``."""
    qpath = Path(questions_path)
    recs = _records(qpath, read_json(qpath, "SQA3D questions"), "questions", "SQA3D questions")
    answers: dict[Any, dict] = {}
    if annotations_path is not None:
        apath = Path(annotations_path)
        anns = _records(
            apath, read_json(apath, "SQA3D annotations"), "annotations", "SQA3D annotations"
        )
        for i, ann in enumerate(anns):
            qid = _get(apath, ann, i, "question_id", (int, str))
            ans = ann.get("answers")
            if not isinstance(ans, list) or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ans
            ):
                raise ScanNetDataError(
                    apath, f"record {i}: 'answers' must be a list of {{'answer': str}}"
                )
            answers[str(qid)] = ann
    out: list[SQARecord] = []
    for i, rec in enumerate(recs):
        scene_id = _get(qpath, rec, i, "scene_id", str)
        if scene_ids is not None and scene_id not in scene_ids:
            continue
        qid = _get(qpath, rec, i, "question_id", (int, str))
        question = _get(qpath, rec, i, "question", str)
        situation = _get(qpath, rec, i, "situation", str)
        alt = rec.get("alternative_situation", [])
        ann = answers.get(str(qid))
        if annotations_path is not None and ann is None:
            logger.warning("%s: question %s has no annotation", annotations_path, qid)
        out.append(
            SQARecord(
                scene_id,
                qid,
                question,
                situation,
                [a["answer"] for a in ann["answers"]] if ann else [],
                [str(a) for a in alt] if isinstance(alt, list) else [],
                ann.get("position") if ann else None,
                ann.get("rotation") if ann else None,
                ann.get("question_type") if ann else None,
            )
        )
    return out
