"""Fake of ``comfy_api.latest.io`` (the v3 node API): schemas, typed inputs/outputs, nodes."""

from dataclasses import dataclass, field


class _Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, **options):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.options = options


class _Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


def _io_type(name):
    input_cls = type("Input", (_Input,), {"io_type": name})
    output_cls = type("Output", (_Output,), {"io_type": name})
    return type(name.title().replace("_", ""), (), {"io_type": name, "Input": input_cls, "Output": output_cls})


Int = _io_type("INT")
Float = _io_type("FLOAT")
String = _io_type("STRING")
Boolean = _io_type("BOOLEAN")
Clip = _io_type("CLIP")
Vae = _io_type("VAE")
Conditioning = _io_type("CONDITIONING")
Latent = _io_type("LATENT")
Image = _io_type("IMAGE")
Model = _io_type("MODEL")
Combo = _io_type("COMBO")  # options=[...]


def Custom(io_type):
    return _io_type(io_type)


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if self.args else None


class ComfyNode:
    @classmethod
    def define_schema(cls):
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs):
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls):
        return cls.define_schema()
