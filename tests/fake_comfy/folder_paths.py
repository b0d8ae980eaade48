"""Fake of ComfyUI's ``folder_paths``: the model-folder registry.

Facts implemented: ``base_path`` / ``models_dir``; ``folder_names_and_paths[name] =
([dirs], {extensions})`` with the default names (``text_encoders`` = models/text_encoders
and models/clip); ``map_legacy`` ("clip" -> "text_encoders", "unet" -> "diffusion_models");
``get_filename_list`` (sorted, recursive, extension-filtered, cached until a folder's mtime
changes), ``get_full_path`` (normalised so ``..`` cannot escape), ``get_full_path_or_raise``,
``get_folder_paths`` (a copy), ``add_model_folder_path``; the input directory is created
next to this file at import.
"""

import logging
import os

from comfy.cli_args import args

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

base_path = os.path.dirname(os.path.realpath(__file__))
if args.base_directory:
    base_path = os.path.abspath(args.base_directory)
models_dir = os.path.join(base_path, "models")


def _models(*names):
    return [os.path.join(models_dir, n) for n in names]


folder_names_and_paths = {
    "checkpoints": (_models("checkpoints"), supported_pt_extensions),
    "configs": (_models("configs"), {".yaml"}),
    "loras": (_models("loras"), supported_pt_extensions),
    "vae": (_models("vae"), supported_pt_extensions),
    "text_encoders": (_models("text_encoders", "clip"), supported_pt_extensions),
    "diffusion_models": (_models("unet", "diffusion_models"), supported_pt_extensions),
    "clip_vision": (_models("clip_vision"), supported_pt_extensions),
    "style_models": (_models("style_models"), supported_pt_extensions),
    "embeddings": (_models("embeddings"), supported_pt_extensions),
    "diffusers": (_models("diffusers"), {"folder"}),
    "vae_approx": (_models("vae_approx"), supported_pt_extensions),
    "controlnet": (_models("controlnet", "t2i_adapter"), supported_pt_extensions),
    "gligen": (_models("gligen"), supported_pt_extensions),
    "upscale_models": (_models("upscale_models"), supported_pt_extensions),
    "custom_nodes": ([os.path.join(base_path, "custom_nodes")], set()),
    "hypernetworks": (_models("hypernetworks"), supported_pt_extensions),
    "photomaker": (_models("photomaker"), supported_pt_extensions),
    "classifiers": (_models("classifiers"), {""}),
    "model_patches": (_models("model_patches"), supported_pt_extensions),
    "audio_encoders": (_models("audio_encoders"), supported_pt_extensions),
}

output_directory = os.path.join(base_path, "output")
temp_directory = os.path.join(base_path, "temp")
input_directory = os.path.join(base_path, "input")
user_directory = os.path.join(base_path, "user")

filename_list_cache = {}

if not os.path.exists(input_directory):
    try:
        os.makedirs(input_directory)
    except OSError:
        logging.error("Failed to create input directory")


def map_legacy(folder_name):
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def set_output_directory(output_dir):
    global output_directory
    output_directory = output_dir


def set_temp_directory(temp_dir):
    global temp_directory
    temp_directory = temp_dir


def set_input_directory(input_dir):
    global input_directory
    input_directory = input_dir


def set_user_directory(user_dir):
    global user_directory
    user_directory = user_dir


def get_output_directory():
    return output_directory


def get_temp_directory():
    return temp_directory


def get_input_directory():
    return input_directory


def get_user_directory():
    return user_directory


def get_folder_paths(folder_name):
    folder_name = map_legacy(folder_name)
    return folder_names_and_paths[folder_name][0][:]


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    folder_name = map_legacy(folder_name)
    if folder_name in folder_names_and_paths:
        paths, _exts = folder_names_and_paths[folder_name]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
    filename_list_cache.pop(folder_name, None)


def recursive_search(directory, excluded_dir_names=None):
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or [])
    result = []
    dirs = {directory: os.path.getmtime(directory)}
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        for name in filenames:
            result.append(os.path.relpath(os.path.join(dirpath, name), directory))
        for d in subdirs:
            path = os.path.join(dirpath, d)
            try:
                dirs[path] = os.path.getmtime(path)
            except OSError:
                continue
    return result, dirs


def filter_files_extensions(files, extensions):
    return sorted(f for f in files if os.path.splitext(f)[-1].lower() in extensions or len(extensions) == 0)


def _cache_valid(entry):
    _files, dirs = entry
    for d, mtime in dirs.items():
        try:
            if os.path.getmtime(d) != mtime:
                return False
        except OSError:
            return False
    return True


def get_filename_list(folder_name):
    folder_name = map_legacy(folder_name)
    cached = filename_list_cache.get(folder_name)
    if cached is not None and _cache_valid(cached):
        return list(cached[0])
    files = set()
    dirs = {}
    paths, extensions = folder_names_and_paths[folder_name]
    for path in paths:
        found, folders = recursive_search(path, excluded_dir_names=[".git"])
        files.update(found)
        dirs.update(folders)
        if not os.path.isdir(path):
            dirs[path] = None  # re-scan once the folder exists
    result = filter_files_extensions(files, extensions)
    filename_list_cache[folder_name] = (result, {d: m for d, m in dirs.items() if m is not None})
    return list(result)


def get_full_path(folder_name, filename):
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for folder in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(folder, filename)
        if os.path.isfile(full_path):
            return full_path
        if os.path.islink(full_path):
            logging.warning(f"WARNING path {full_path} exists but doesn't link anywhere, skipping.")
    return None


def get_full_path_or_raise(folder_name, filename):
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path
