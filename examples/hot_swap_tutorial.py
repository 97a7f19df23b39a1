# %% [markdown]
# # Model hot swap tutorial
#
# The Wallaroo model hot-swap tutorial, run against hotswap: only the import and the client
# line differ. A pipeline serves a house-price model; we replace the model behind the live
# pipeline twice, and every request keeps being answered while the swap happens.
#
# Before running: start a stack in another terminal (`hotswap up`) and make the models
# (`make models`). Cells are `# %%` blocks: run them in VS Code / Jupyter (jupytext) or run the
# whole file with `python examples/hot_swap_tutorial.py` from the repository root.

# %%
import os
from pathlib import Path

import pandas as pd

import hotswap

pd.set_option("display.width", 200)  # show every column when printed in a terminal
pd.set_option("display.max_columns", None)

# %% [markdown]
# ## Connect and set the variables

# %%
wl = hotswap.Client()  # $HOTSWAP_ADDRESS, else localhost:50051 (what `hotswap up` serves)

models_dir = Path(os.environ.get("HOTSWAP_MODELS", "examples/housing/models"))
workspace_name = "hotswapworkspace"
pipeline_name = "hotswappipeline"
original_model_name = "housingmodelcontrol"
original_model_file_name = models_dir / "rf_model.onnx"
replacement_model_name01 = "gbrhousingchallenger"
replacement_model_file_name01 = models_dir / "gbr_model.onnx"
replacement_model_name02 = "xgbhousingchallenger"
replacement_model_file_name02 = models_dir / "xgb_model.onnx"

# %% [markdown]
# ## Create the workspace and make it current

# %%
workspace = wl.get_workspace(name=workspace_name, create_if_not_exist=True)
wl.set_current_workspace(workspace)
print(wl.get_current_workspace())

# %% [markdown]
# ## Upload the models

# %%
housing_model_control = wl.upload_model(
    original_model_name, original_model_file_name, framework=hotswap.Framework.ONNX
).configure(tensor_fields=["tensor"])
housing_model_challenger01 = wl.upload_model(
    replacement_model_name01, replacement_model_file_name01, framework=hotswap.Framework.ONNX
).configure(tensor_fields=["tensor"])
housing_model_challenger02 = wl.upload_model(
    replacement_model_name02, replacement_model_file_name02, framework=hotswap.Framework.ONNX
).configure(tensor_fields=["tensor"])
print(wl.list_models())

# %% [markdown]
# ## Build the pipeline with the control model and deploy it

# %%
mainpipeline = wl.build_pipeline(pipeline_name)
mainpipeline.clear()  # a rerun starts from an empty pipeline, as a fresh notebook would
mainpipeline.add_model_step(housing_model_control)
mainpipeline.deploy()
print(mainpipeline)
print(mainpipeline.status())

# %% [markdown]
# ## Infer with the control model

# %%
normal_input = pd.DataFrame(
    {
        "tensor": [
            [4.0, 2.5, 2900.0, 5505.0, 2.0, 0.0, 0.0, 3.0, 8.0, 2900.0, 0.0, 47.6063, -122.02,
             2970.0, 5251.0, 12.0, 0.0, 0.0]
        ]
    }
)  # fmt: skip
result = mainpipeline.infer(normal_input)
print(result)
print("out.variable:", result.loc[0, "out.variable"])

# %% [markdown]
# ## Hot swap to the first challenger
#
# `replace_with_model_step` stages the new model; `deploy()` makes a new pipeline version and
# swaps it in on every engine. It returns once the new version serves every new request.

# %%
mainpipeline.replace_with_model_step(0, housing_model_challenger01).deploy()
swap = mainpipeline.last_deploy()
assert swap is not None
print(f"swapped in {swap.wall_ms:.0f} ms (server: prepare {swap.prepare_ms:.0f} ms, ", end="")
print(f"commit {swap.commit_ms:.1f} ms)")
print(mainpipeline.status())

# %%
result02 = mainpipeline.infer(normal_input)
print(result02)
print("served by pipeline version", result02.attrs["hotswap.pipeline_version"])

# %% [markdown]
# ## Hot swap to the second challenger

# %%
mainpipeline.replace_with_model_step(0, housing_model_challenger02).deploy()
result03 = mainpipeline.infer(normal_input)
print(result03)

# %% [markdown]
# ## Compare, look at the versions, roll back

# %%
comparison = pd.DataFrame(
    {
        "model": [original_model_name, replacement_model_name01, replacement_model_name02],
        "prediction": [r["out.variable"].tolist()[0][0] for r in (result, result02, result03)],
        "pipeline version": [
            r.attrs["hotswap.pipeline_version"] for r in (result, result02, result03)
        ],
    }
)
print(comparison)
print(mainpipeline.versions())

# %%
first = mainpipeline.versions()[-3]  # this run's first version: the control model
mainpipeline.deploy(version=first)  # a rollback is a hot swap to an older version
print(mainpipeline.infer(normal_input).loc[0, "out.variable"])

# %% [markdown]
# ## Undeploy the pipeline

# %%
mainpipeline.undeploy()
print(mainpipeline.status()["status"])
wl.close()
