"""An in-memory search engine for the real Argilla 2.8 server, used only by the tests.

The server's search engines (Elasticsearch 8, OpenSearch 2) cannot be installed here. The server
chooses its engine by name from a registry (``ARGILLA_SEARCH_ENGINE``), so this module registers
``memory`` and :mod:`serve` imports it before starting the unmodified server. It runs inside the
server's own virtual environment, never in the project's.

What it does: index, partial update and delete records; responses and suggestions; text queries
(case-insensitive, every word must occur); terms and range filters on metadata, suggestions,
record properties and responses (including the ``pending`` status); sorting; cosine similarity
search; metadata metrics; dataset and user progress. What it does not: scoring (every hit scores
1.0, so tests assert on which records come back, not on scores), persistence (the index is lost
on restart), and ES query-string syntax.
"""

import math
from typing import Any
from uuid import UUID

from argilla_server.enums import MetadataPropertyType, SimilarityOrder, SortOrder
from argilla_server.search_engine.base import (
    AndFilter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)

_INDEXES: dict[str, dict[str, dict[str, Any]]] = {}


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _response_doc(response: Any) -> dict[str, Any]:
    return {
        "id": str(response.id),
        "status": _value(response.status),
        "user_id": str(response.user_id),
        "values": {question: (value or {}).get("value") for question, value in (response.values or {}).items()},
    }


def _record_doc(record: Any) -> dict[str, Any]:
    dataset = record.dataset
    names = {p.name for p in dataset.metadata_properties}
    return {
        "id": str(record.id),
        "external_id": record.external_id,
        "fields": {k: v for k, v in (record.fields or {}).items()},
        "status": _value(record.status),
        "inserted_at": record.inserted_at,
        "updated_at": record.updated_at,
        "metadata": {k: v for k, v in (record.metadata_ or {}).items() if k in names and v is not None},
        "responses": [_response_doc(r) for r in record.responses or []],
        "suggestions": {
            s.question.name: {"type": _value(s.type), "agent": s.agent, "score": s.score, "value": s.value}
            for s in record.suggestions or []
        },
        "vectors": {v.vector_settings.name: list(v.value) for v in record.vectors or []},
    }


def _scope_values(doc: dict[str, Any], scope: Any) -> list[Any]:
    if isinstance(scope, MetadataFilterScope):
        value = doc["metadata"].get(str(scope.metadata_property))
    elif isinstance(scope, SuggestionFilterScope):
        value = (doc["suggestions"].get(scope.question) or {}).get(scope.property)
    elif isinstance(scope, RecordFilterScope):
        value = doc.get(scope.property)
    elif isinstance(scope, ResponseFilterScope):
        responses = [r for r in doc["responses"] if scope.user is None or r["user_id"] == str(scope.user.id)]
        if scope.question:
            return [r["values"].get(scope.question) for r in responses if r["values"].get(scope.question) is not None]
        return [r[scope.property] for r in responses]
    else:
        raise ValueError(f"Cannot process request for search scope {scope}")
    return [] if value is None else [value]


def _flatten(values: list[Any]) -> list[Any]:
    out = []
    for value in values:
        out.extend(value if isinstance(value, list) else [value])
    return [_value(v) for v in out]


def _matches(doc: dict[str, Any], filter: Any) -> bool:
    if filter is None:
        return True
    if isinstance(filter, AndFilter):
        return all(_matches(doc, f) for f in filter.filters)
    values = _flatten(_scope_values(doc, filter.scope))
    if isinstance(filter, TermsFilter):
        wanted = {str(_value(v)) for v in filter.values}
        hit = any(str(v) in wanted for v in values)
        if isinstance(filter.scope, ResponseFilterScope) and filter.scope.property == "status" and "pending" in wanted:
            hit = hit or not values  # no response (by this user) means pending
        return hit
    if isinstance(filter, RangeFilter):
        return any(
            (filter.ge is None or v >= filter.ge) and (filter.le is None or v <= filter.le)
            for v in values
            if isinstance(v, (int, float))
        )
    raise ValueError(f"Cannot process request for filter {filter}")


def _text_matches(doc: dict[str, Any], query: Any) -> bool:
    if query is None:
        return True
    text, field = (query.q, query.field) if isinstance(query, TextQuery) else (str(query), None)
    if text.strip() in ("", "*"):
        return True
    fields = [doc["fields"].get(field)] if field else list(doc["fields"].values())
    haystack = " ".join(str(v) for v in fields if v is not None).lower()
    return all(word in haystack for word in text.lower().split())


def _sort_key(doc: dict[str, Any], order: Any) -> tuple:
    values = _flatten(_scope_values(doc, order.scope))
    if not values:
        return (1, 0)
    numeric = [v for v in values if isinstance(v, (int, float))]
    value = sum(numeric) / len(numeric) if numeric else str(values[0])
    return (0, value)


@SearchEngine.register(engine_name="memory")
class InMemorySearchEngine(SearchEngine):
    @classmethod
    async def new_instance(cls) -> "InMemorySearchEngine":
        return cls()

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def info(self) -> dict:
        return {"engine": "memory", "records": sum(len(index) for index in _INDEXES.values())}

    def _index(self, dataset: Any) -> dict[str, dict[str, Any]]:
        return _INDEXES.setdefault(str(dataset.id), {})

    async def create_index(self, dataset: Any) -> None:
        self._index(dataset)

    async def delete_index(self, dataset: Any) -> None:
        _INDEXES.pop(str(dataset.id), None)

    async def configure_metadata_property(self, dataset: Any, metadata_property: Any) -> None:
        self._index(dataset)

    async def configure_index_vectors(self, vector_settings: Any) -> None:
        return None

    async def index_records(self, dataset: Any, records: Any) -> None:
        index = self._index(dataset)
        for record in records:
            index[str(record.id)] = _record_doc(record)

    async def partial_record_update(self, record: Any, **update: Any) -> None:
        doc = self._index(record.dataset).get(str(record.id))
        if doc is not None:
            doc.update({k: _value(v) for k, v in update.items()})

    async def delete_records(self, dataset: Any, records: Any) -> None:
        index = self._index(dataset)
        for record in records:
            index.pop(str(record.id), None)

    async def update_record_response(self, response: Any) -> None:
        doc = self._index(response.record.dataset).get(str(response.record.id))
        if doc is not None:
            doc["responses"] = [r for r in doc["responses"] if r["id"] != str(response.id)] + [_response_doc(response)]

    async def delete_record_response(self, response: Any) -> None:
        doc = self._index(response.record.dataset).get(str(response.record.id))
        if doc is not None:
            doc["responses"] = [r for r in doc["responses"] if r["id"] != str(response.id)]

    async def update_record_suggestion(self, suggestion: Any) -> None:
        doc = self._index(suggestion.record.dataset).get(str(suggestion.record_id))
        if doc is not None:
            doc["suggestions"][suggestion.question.name] = {
                "type": _value(suggestion.type), "agent": suggestion.agent, "score": suggestion.score, "value": suggestion.value
            }  # fmt: skip

    async def delete_record_suggestion(self, suggestion: Any) -> None:
        doc = self._index(suggestion.record.dataset).get(str(suggestion.record_id))
        if doc is not None:
            doc["suggestions"].pop(suggestion.question.name, None)

    async def get_dataset_progress(self, dataset: Any) -> dict:
        if dataset.is_draft:
            return {}
        counts: dict[str, int] = {}
        for doc in self._index(dataset).values():
            counts[doc["status"]] = counts.get(doc["status"], 0) + 1
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Any, user: Any) -> dict:
        if dataset.is_draft:
            return {}
        counts: dict[str, int] = {}
        for doc in self._index(dataset).values():
            for response in doc["responses"]:
                if response["user_id"] == str(user.id):
                    counts[response["status"]] = counts.get(response["status"], 0) + 1
        return {"total": sum(counts.values()), **counts}

    def _select(self, dataset: Any, query: Any, filter: Any) -> list[dict[str, Any]]:
        return [d for d in self._index(dataset).values() if _text_matches(d, query) and _matches(d, filter)]

    async def search(
        self, dataset: Any, query: Any = None, filter: Any = None, sort: Any = None, offset: int = 0, limit: int = 100,
        user_id: str | None = None,
    ) -> SearchResponses:  # fmt: skip
        docs = self._select(dataset, query, filter)
        for order in reversed(sort or []):  # stable sorts, last key first
            docs.sort(key=lambda d, o=order: _sort_key(d, o), reverse=_value(order.order) == SortOrder.desc.value)
            docs.sort(key=lambda d, o=order: _sort_key(d, o)[0])  # missing values last either way
        items = [SearchResponseItem(record_id=UUID(d["id"]), score=1.0) for d in docs[offset : offset + limit]]
        return SearchResponses(items=items, total=len(docs))

    async def compute_metrics_for(self, metadata_property: Any) -> Any:
        values = [
            d["metadata"][metadata_property.name]
            for d in self._index(metadata_property.dataset).values()
            if metadata_property.name in d["metadata"]
        ]
        kind = _value(metadata_property.type)
        if kind == MetadataPropertyType.terms.value:
            counts: dict[str, int] = {}
            for value in _flatten(values):
                counts[str(value)] = counts.get(str(value), 0) + 1
            terms = [TermsMetrics.TermCount(term=t, count=c) for t, c in sorted(counts.items(), key=lambda x: -x[1])]
            return TermsMetrics(total=sum(counts.values()), values=terms)
        cls = IntegerMetadataMetrics if kind == MetadataPropertyType.integer.value else FloatMetadataMetrics
        return cls(min=min(values), max=max(values)) if values else cls()

    async def similarity_search(
        self, dataset: Any, vector_settings: Any, value: list[float] | None = None, record: Any = None,
        query: Any = None, filter: Any = None, max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar, threshold: float | None = None,
    ) -> SearchResponses:  # fmt: skip
        name = vector_settings.name
        if value is None and record is not None:
            value = (self._index(dataset).get(str(record.id)) or {}).get("vectors", {}).get(name)
        if value is None:
            raise ValueError("a vector value or a record with a vector is needed")
        scored = []
        for doc in self._select(dataset, query, filter):
            other = doc["vectors"].get(name)
            if other is None or (record is not None and doc["id"] == str(record.id)):
                continue
            norm = math.sqrt(sum(a * a for a in value)) * math.sqrt(sum(b * b for b in other))
            score = sum(a * b for a, b in zip(value, other)) / norm if norm else 0.0
            if threshold is None or score >= threshold:
                scored.append((score, doc["id"]))
        scored.sort(reverse=_value(order) == SimilarityOrder.most_similar.value)
        items = [SearchResponseItem(record_id=UUID(i), score=s) for s, i in scored[:max_results]]
        return SearchResponses(items=items, total=len(scored))
