"""This project's own PEFT methods, registered with PEFT by one explicit call (importing changes no PEFT table)."""


def register_methods() -> None:
    """Make WaRA a PEFT method like PEFT's own: `add_adapter`, `get_peft_model_state_dict` and
    `PeftModel.from_pretrained` then handle WaRA adapters. What `peft.utils.register_peft_method` does, which only
    accepts members of PEFT's own `PeftType`. Idempotent; entry points call it before loading any adapter."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from waveft.adapters.wara import WaraConfig, WaraModel, WaraPeftType

    peft_type = WaraPeftType.WARA
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = WaraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = WaraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = WaraModel.prefix
