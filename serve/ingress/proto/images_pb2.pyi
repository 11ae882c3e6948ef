from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Quality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUALITY_UNSPECIFIED: _ClassVar[Quality]
    QUALITY_LOW: _ClassVar[Quality]
    QUALITY_STANDARD: _ClassVar[Quality]
    QUALITY_HIGH: _ClassVar[Quality]
QUALITY_UNSPECIFIED: Quality
QUALITY_LOW: Quality
QUALITY_STANDARD: Quality
QUALITY_HIGH: Quality

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "tier", "n", "size", "seed", "steps", "guidance", "quality", "model", "template", "variables", "moderation", "response_format", "output_format", "output_quality", "aspect_ratios", "megapixels", "approval_id")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    MODERATION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_QUALITY_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIOS_FIELD_NUMBER: _ClassVar[int]
    MEGAPIXELS_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    tier: str
    n: int
    size: str
    seed: int
    steps: int
    guidance: float
    quality: Quality
    model: str
    template: str
    variables: _containers.ScalarMap[str, str]
    moderation: str
    response_format: str
    output_format: str
    output_quality: int
    aspect_ratios: _containers.RepeatedScalarFieldContainer[str]
    megapixels: float
    approval_id: str
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., tier: _Optional[str] = ..., n: _Optional[int] = ..., size: _Optional[str] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., quality: _Optional[_Union[Quality, str]] = ..., model: _Optional[str] = ..., template: _Optional[str] = ..., variables: _Optional[_Mapping[str, str]] = ..., moderation: _Optional[str] = ..., response_format: _Optional[str] = ..., output_format: _Optional[str] = ..., output_quality: _Optional[int] = ..., aspect_ratios: _Optional[_Iterable[str]] = ..., megapixels: _Optional[float] = ..., approval_id: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("seed", "width", "height", "mime_type", "data", "alt_text", "safety", "id", "aspect_ratio", "url")
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ALT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SAFETY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    seed: int
    width: int
    height: int
    mime_type: str
    data: bytes
    alt_text: str
    safety: ImageSafety
    id: str
    aspect_ratio: str
    url: str
    def __init__(self, seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., mime_type: _Optional[str] = ..., data: _Optional[bytes] = ..., alt_text: _Optional[str] = ..., safety: _Optional[_Union[ImageSafety, _Mapping]] = ..., id: _Optional[str] = ..., aspect_ratio: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class ImageSafety(_message.Message):
    __slots__ = ("action", "category", "review_id")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    action: str
    category: str
    review_id: str
    def __init__(self, action: _Optional[str] = ..., category: _Optional[str] = ..., review_id: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "generate_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    generate_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("id", "trace_id", "created", "tier", "model", "revision", "fallback", "batch_images", "cost_units", "images", "timings", "pinned", "price", "replayed", "template", "template_successor", "template_sunset", "cached")
    ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    BATCH_IMAGES_FIELD_NUMBER: _ClassVar[int]
    COST_UNITS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_SUCCESSOR_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_SUNSET_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    id: str
    trace_id: str
    created: int
    tier: str
    model: str
    revision: str
    fallback: bool
    batch_images: int
    cost_units: float
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timings: Timings
    pinned: bool
    price: float
    replayed: bool
    template: str
    template_successor: str
    template_sunset: str
    cached: bool
    def __init__(self, id: _Optional[str] = ..., trace_id: _Optional[str] = ..., created: _Optional[int] = ..., tier: _Optional[str] = ..., model: _Optional[str] = ..., revision: _Optional[str] = ..., fallback: _Optional[bool] = ..., batch_images: _Optional[int] = ..., cost_units: _Optional[float] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., pinned: _Optional[bool] = ..., price: _Optional[float] = ..., replayed: _Optional[bool] = ..., template: _Optional[str] = ..., template_successor: _Optional[str] = ..., template_sunset: _Optional[str] = ..., cached: _Optional[bool] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class StoredImage(_message.Message):
    __slots__ = ("id", "request_id", "created", "expires", "mime_type", "width", "height", "aspect_ratio", "seed", "tier", "model", "revision", "template", "approval_id", "safety", "alt_text", "cost_units", "cached", "url", "recipe_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    SAFETY_FIELD_NUMBER: _ClassVar[int]
    ALT_TEXT_FIELD_NUMBER: _ClassVar[int]
    COST_UNITS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    RECIPE_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    request_id: str
    created: str
    expires: str
    mime_type: str
    width: int
    height: int
    aspect_ratio: str
    seed: int
    tier: str
    model: str
    revision: str
    template: str
    approval_id: str
    safety: ImageSafety
    alt_text: str
    cost_units: float
    cached: bool
    url: str
    recipe_json: str
    def __init__(self, id: _Optional[str] = ..., request_id: _Optional[str] = ..., created: _Optional[str] = ..., expires: _Optional[str] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., aspect_ratio: _Optional[str] = ..., seed: _Optional[int] = ..., tier: _Optional[str] = ..., model: _Optional[str] = ..., revision: _Optional[str] = ..., template: _Optional[str] = ..., approval_id: _Optional[str] = ..., safety: _Optional[_Union[ImageSafety, _Mapping]] = ..., alt_text: _Optional[str] = ..., cost_units: _Optional[float] = ..., cached: _Optional[bool] = ..., url: _Optional[str] = ..., recipe_json: _Optional[str] = ...) -> None: ...

class RerollRequest(_message.Message):
    __slots__ = ("id", "seed")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    id: str
    seed: int
    def __init__(self, id: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDefaults(_message.Message):
    __slots__ = ("width", "height", "steps", "guidance")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    steps: int
    guidance: float
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ...) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("min_size", "max_width", "max_height", "max_steps", "max_guidance", "max_images")
    MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    min_size: int
    max_width: int
    max_height: int
    max_steps: int
    max_guidance: float
    max_images: int
    def __init__(self, min_size: _Optional[int] = ..., max_width: _Optional[int] = ..., max_height: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_guidance: _Optional[float] = ..., max_images: _Optional[int] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "revision", "deployment", "pipeline", "dtype", "license", "commercial_use", "tiers", "defaults", "limits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LICENSE_FIELD_NUMBER: _ClassVar[int]
    COMMERCIAL_USE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    revision: str
    deployment: str
    pipeline: str
    dtype: str
    license: str
    commercial_use: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    defaults: ModelDefaults
    limits: ModelLimits
    def __init__(self, name: _Optional[str] = ..., revision: _Optional[str] = ..., deployment: _Optional[str] = ..., pipeline: _Optional[str] = ..., dtype: _Optional[str] = ..., license: _Optional[str] = ..., commercial_use: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., defaults: _Optional[_Union[ModelDefaults, _Mapping]] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetQuotaRequest(_message.Message):
    __slots__ = ("principal",)
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    principal: str
    def __init__(self, principal: _Optional[str] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("principal", "plan", "bucket_units", "burst", "refill_per_s", "credits", "today_units", "daily_units", "month_units", "held")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BUCKET_UNITS_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    REFILL_PER_S_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    TODAY_UNITS_FIELD_NUMBER: _ClassVar[int]
    DAILY_UNITS_FIELD_NUMBER: _ClassVar[int]
    MONTH_UNITS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    principal: str
    plan: str
    bucket_units: float
    burst: float
    refill_per_s: float
    credits: float
    today_units: float
    daily_units: float
    month_units: float
    held: int
    def __init__(self, principal: _Optional[str] = ..., plan: _Optional[str] = ..., bucket_units: _Optional[float] = ..., burst: _Optional[float] = ..., refill_per_s: _Optional[float] = ..., credits: _Optional[float] = ..., today_units: _Optional[float] = ..., daily_units: _Optional[float] = ..., month_units: _Optional[float] = ..., held: _Optional[int] = ...) -> None: ...

class ListTemplatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TemplateVariable(_message.Message):
    __slots__ = ("type", "values", "max_length", "pattern", "min", "max", "integer", "default")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    type: str
    values: _containers.RepeatedScalarFieldContainer[str]
    max_length: int
    pattern: str
    min: float
    max: float
    integer: bool
    default: str
    def __init__(self, type: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., max_length: _Optional[int] = ..., pattern: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., integer: _Optional[bool] = ..., default: _Optional[str] = ...) -> None: ...

class Template(_message.Message):
    __slots__ = ("id", "version", "status", "kind", "description", "owner", "tiers", "variables", "free_text", "deprecated_on", "successor", "preview")
    class VariablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TemplateVariable
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TemplateVariable, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    FREE_TEXT_FIELD_NUMBER: _ClassVar[int]
    DEPRECATED_ON_FIELD_NUMBER: _ClassVar[int]
    SUCCESSOR_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    status: str
    kind: str
    description: str
    owner: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    variables: _containers.MessageMap[str, TemplateVariable]
    free_text: str
    deprecated_on: str
    successor: str
    preview: str
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., status: _Optional[str] = ..., kind: _Optional[str] = ..., description: _Optional[str] = ..., owner: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., variables: _Optional[_Mapping[str, TemplateVariable]] = ..., free_text: _Optional[str] = ..., deprecated_on: _Optional[str] = ..., successor: _Optional[str] = ..., preview: _Optional[str] = ...) -> None: ...

class ListTemplatesResponse(_message.Message):
    __slots__ = ("templates",)
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    templates: _containers.RepeatedCompositeFieldContainer[Template]
    def __init__(self, templates: _Optional[_Iterable[_Union[Template, _Mapping]]] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("id", "requests", "completion_window_s", "webhook_url")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    id: str
    requests: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    completion_window_s: int
    webhook_url: str
    def __init__(self, id: _Optional[str] = ..., requests: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ..., completion_window_s: _Optional[int] = ..., webhook_url: _Optional[str] = ...) -> None: ...

class BatchRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("id", "state", "created", "deadline", "counts", "progress", "late", "webhook_url", "manifest")
    class CountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    created: float
    deadline: float
    counts: _containers.ScalarMap[str, int]
    progress: float
    late: bool
    webhook_url: str
    manifest: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., created: _Optional[float] = ..., deadline: _Optional[float] = ..., counts: _Optional[_Mapping[str, int]] = ..., progress: _Optional[float] = ..., late: _Optional[bool] = ..., webhook_url: _Optional[str] = ..., manifest: _Optional[str] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[Batch]
    def __init__(self, batches: _Optional[_Iterable[_Union[Batch, _Mapping]]] = ...) -> None: ...

class BatchItemResult(_message.Message):
    __slots__ = ("image_ids", "seeds", "revision", "model", "cost_units", "cached", "withheld")
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    SEEDS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    COST_UNITS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    WITHHELD_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    seeds: _containers.RepeatedScalarFieldContainer[int]
    revision: str
    model: str
    cost_units: float
    cached: bool
    withheld: int
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ..., seeds: _Optional[_Iterable[int]] = ..., revision: _Optional[str] = ..., model: _Optional[str] = ..., cost_units: _Optional[float] = ..., cached: _Optional[bool] = ..., withheld: _Optional[int] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("index", "state", "attempts", "result", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    state: str
    attempts: int
    result: BatchItemResult
    error: str
    def __init__(self, index: _Optional[int] = ..., state: _Optional[str] = ..., attempts: _Optional[int] = ..., result: _Optional[_Union[BatchItemResult, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class BatchResults(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ...) -> None: ...
