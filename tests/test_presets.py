"""Every training config of the reference has a preset of the same name that composes to the same recipe.

TABLE holds, per reference config (recognition/arcface_torch/configs/<name>.py), the values its file sets, laid
over the reference's base config (BASE) the way the reference loads them; each preset is composed with Hydra and
every recipe value is looked up under this project's key.
"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONF, compose_config

ABSENT = "<absent>"
PAIR_SETS = ("lfw", "cfp_fp", "agedb_30")

# The reference's base config: what a config file does not set.
BASE = {"network": "r50", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512, "sample_rate": 1.0,
        "interclass_filtering_threshold": 0, "fp16": False, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
        "batch_size": 128, "gradient_acc": 1, "dali": False}

# The reference's network names: backbone, drop-path, mask ratio (the ViTs as its model factory builds them).
NETWORKS = {
    "vit_t_dp005_mask0": ("vit_t", 0.05, 0.0),
    "vit_s_dp005_mask_0": ("vit_s", 0.05, 0.0),
    "vit_b_dp005_mask_005": ("vit_b", 0.05, 0.05),
    "vit_l_dp005_mask_005": ("vit_l", 0.05, 0.05),
    "vit_h": ("vit_h", 0.1, 0.0),
}

# The reference's `rec` folders: this project's dataset option.
DATASETS = {
    "synthetic": "synthetic",
    "/train_tmp/faces_emore": "ms1mv2",
    "/train_tmp/ms1m-retinaface-t1": "ms1mv3",
    "/train_tmp/glint360k": "glint360k",
    "/train_tmp/WebFace4M": "webface4m",
    "/train_tmp/WebFace12M": "webface12m",
    "/train_tmp/WebFace12M_FLIP40": "webface12m_flip40",
    "/train_tmp/WebFace12M_Conflict": "webface12m_conflict",
    "/train_tmp/WebFace42M": "webface42m",
}

OPTIMIZERS = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}

TABLE = {
    "3millions": {**BASE, "network": "mbf", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512, "sample_rate": 0.1,
                  "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 512, "num_epoch": 30,
                  "warmup_epoch": -1, "rec": "synthetic", "num_classes": 300000, "num_image": 100000,
                  "val_targets": ()},
    "glint360k_mbf": {**BASE, "network": "mbf", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                      "sample_rate": 1.0, "fp16": True, "lr": 0.1, "weight_decay": 0.0001, "batch_size": 128,
                      "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/glint360k", "num_classes": 360232,
                      "num_image": 17091657, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "glint360k_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                       "sample_rate": 1.0, "fp16": True, "lr": 0.1, "weight_decay": 0.0001, "batch_size": 128,
                       "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/glint360k", "num_classes": 360232,
                       "num_image": 17091657, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "glint360k_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                      "sample_rate": 1.0, "fp16": True, "lr": 0.1, "weight_decay": 0.0001, "batch_size": 128,
                      "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/glint360k", "num_classes": 360232,
                      "num_image": 17091657, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv2_mbf": {**BASE, "network": "mbf", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512, "sample_rate": 1.0,
                   "fp16": True, "lr": 0.1, "weight_decay": 0.0001, "batch_size": 128, "num_epoch": 40,
                   "warmup_epoch": 0, "rec": "/train_tmp/faces_emore", "num_classes": 85742, "num_image": 5822653,
                   "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv2_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512,
                    "sample_rate": 1.0, "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128,
                    "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/faces_emore", "num_classes": 85742,
                    "num_image": 5822653, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv2_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512, "sample_rate": 1.0,
                   "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20,
                   "warmup_epoch": 0, "rec": "/train_tmp/faces_emore", "num_classes": 85742, "num_image": 5822653,
                   "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv3_mbf": {**BASE, "network": "mbf", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512, "sample_rate": 1.0,
                   "fp16": True, "lr": 0.1, "weight_decay": 0.0001, "batch_size": 128, "num_epoch": 40,
                   "warmup_epoch": 0, "rec": "/train_tmp/ms1m-retinaface-t1", "num_classes": 93431,
                   "num_image": 5179510, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv3_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512,
                    "sample_rate": 1.0, "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128,
                    "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/ms1m-retinaface-t1", "num_classes": 93431,
                    "num_image": 5179510, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv3_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512, "sample_rate": 1.0,
                   "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20,
                   "warmup_epoch": 0, "rec": "/train_tmp/ms1m-retinaface-t1", "num_classes": 93431,
                   "num_image": 5179510, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "ms1mv3_r50_onegpu": {**BASE, "network": "r50", "margin_list": (1.0, 0.5, 0.0), "embedding_size": 512,
                          "sample_rate": 1.0, "fp16": True, "lr": 0.02, "weight_decay": 0.0005, "batch_size": 128,
                          "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/ms1m-retinaface-t1",
                          "num_classes": 93431, "num_image": 5179510, "val_targets": ("lfw", "cfp_fp", "agedb_30"),
                          "dali": False},
    "wf12m_conflict_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                           "sample_rate": 1.0, "interclass_filtering_threshold": 0, "fp16": True, "optimizer": "sgd",
                           "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20, "warmup_epoch": 2,
                           "rec": "/train_tmp/WebFace12M_Conflict", "num_classes": 1017970, "num_image": 12720066,
                           "val_targets": (), "dali": False},
    "wf12m_conflict_r50_pfc03_filter04": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4),
                                          "embedding_size": 512, "sample_rate": 0.3,
                                          "interclass_filtering_threshold": 0.4, "fp16": True, "optimizer": "sgd",
                                          "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20,
                                          "warmup_epoch": 2, "rec": "/train_tmp/WebFace12M_Conflict",
                                          "num_classes": 1017970, "num_image": 12720066, "val_targets": (),
                                          "dali": False},
    "wf12m_flip_pfc01_filter04_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                      "sample_rate": 0.1, "interclass_filtering_threshold": 0.4, "fp16": True,
                                      "optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128,
                                      "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace12M_FLIP40",
                                      "num_classes": 617970, "num_image": 12720066, "val_targets": (), "dali": False},
    "wf12m_flip_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                       "sample_rate": 1.0, "interclass_filtering_threshold": 0, "fp16": True, "optimizer": "sgd",
                       "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20, "warmup_epoch": 2,
                       "rec": "/train_tmp/WebFace12M_FLIP40", "num_classes": 617970, "num_image": 12720066,
                       "val_targets": (), "dali": False},
    "wf12m_mbf": {**BASE, "network": "mbf", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512, "sample_rate": 1.0,
                  "interclass_filtering_threshold": 0, "fp16": True, "optimizer": "sgd", "lr": 0.1,
                  "weight_decay": 0.0001, "batch_size": 128, "num_epoch": 20, "warmup_epoch": 0,
                  "rec": "/train_tmp/WebFace12M", "num_classes": 617970, "num_image": 12720066, "val_targets": (),
                  "dali": False},
    "wf12m_pfc02_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                         "sample_rate": 0.2, "interclass_filtering_threshold": 0, "fp16": True, "optimizer": "sgd",
                         "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20, "warmup_epoch": 0,
                         "rec": "/train_tmp/WebFace12M", "num_classes": 617970, "num_image": 12720066,
                         "val_targets": (), "dali": False},
    "wf12m_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                   "sample_rate": 1.0, "interclass_filtering_threshold": 0, "fp16": True, "optimizer": "sgd",
                   "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20, "warmup_epoch": 0,
                   "rec": "/train_tmp/WebFace12M", "num_classes": 617970, "num_image": 12720066, "val_targets": (),
                   "dali": False},
    "wf12m_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512, "sample_rate": 1.0,
                  "interclass_filtering_threshold": 0, "fp16": True, "optimizer": "sgd", "lr": 0.1,
                  "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20, "warmup_epoch": 0,
                  "rec": "/train_tmp/WebFace12M", "num_classes": 617970, "num_image": 12720066, "val_targets": (),
                  "dali": False},
    "wf42m_pfc0008_32gpu_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                 "sample_rate": 0, "fp16": True, "lr": 0.4, "weight_decay": 0.0005, "batch_size": 512,
                                 "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                                 "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                                 "agedb_30"), "dali": False},
    "wf42m_pfc02_16gpus_mbf_bs8k": {**BASE, "network": "mbf", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                    "sample_rate": 0.2, "fp16": True, "lr": 0.4, "weight_decay": 0.0001,
                                    "batch_size": 512, "num_epoch": 20, "warmup_epoch": 2,
                                    "rec": "/train_tmp/WebFace42M", "num_classes": 2059906, "num_image": 42474557,
                                    "val_targets": (), "dali": False},
    "wf42m_pfc02_16gpus_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                "sample_rate": 0.2, "fp16": True, "lr": 0.3, "weight_decay": 0.0005, "batch_size": 256,
                                "num_epoch": 20, "warmup_epoch": 1, "rec": "/train_tmp/WebFace42M",
                                "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                                "agedb_30"), "dali": False},
    "wf42m_pfc02_16gpus_r50_bs8k": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                    "sample_rate": 0.2, "fp16": True, "lr": 0.6, "weight_decay": 0.0005,
                                    "batch_size": 512, "num_epoch": 20, "warmup_epoch": 4,
                                    "rec": "/train_tmp/WebFace42M", "num_classes": 2059906, "num_image": 42474557,
                                    "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "wf42m_pfc02_32gpus_r50_bs4k": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                    "sample_rate": 0.2, "fp16": True, "lr": 0.4, "weight_decay": 0.0005,
                                    "batch_size": 128, "num_epoch": 20, "warmup_epoch": 2,
                                    "rec": "/train_tmp/WebFace42M", "num_classes": 2059906, "num_image": 42474557,
                                    "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "wf42m_pfc02_8gpus_r50_bs4k": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                   "sample_rate": 0.2, "fp16": True, "lr": 0.4, "weight_decay": 0.0005,
                                   "batch_size": 512, "num_epoch": 20, "warmup_epoch": 2,
                                   "rec": "/train_tmp/WebFace42M", "num_classes": 2059906, "num_image": 42474557,
                                   "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "wf42m_pfc02_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                         "sample_rate": 0.2, "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128,
                         "num_epoch": 20, "warmup_epoch": 0, "rec": "/train_tmp/WebFace42M", "num_classes": 2059906,
                         "num_image": 42474557, "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "wf42m_pfc02_r100_16gpus": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                "sample_rate": 0.2, "fp16": True, "lr": 0.2, "weight_decay": 0.0005, "batch_size": 128,
                                "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                                "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                                "agedb_30"), "dali": False},
    "wf42m_pfc02_r100_32gpus": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                                "sample_rate": 0.2, "fp16": True, "lr": 0.4, "weight_decay": 0.0005, "batch_size": 128,
                                "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                                "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                                "agedb_30"), "dali": False},
    "wf42m_pfc02_vit_h": {**BASE, "network": "vit_h", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                          "sample_rate": 0.5, "fp16": True, "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.1,
                          "batch_size": 768, "num_epoch": 16, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                          "num_classes": 2059906, "num_image": 42474557, "val_targets": (), "dali": True},
    "wf42m_pfc03_32gpu_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                               "sample_rate": 0.3, "fp16": True, "lr": 0.4, "weight_decay": 0.0005, "batch_size": 128,
                               "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                               "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                               "agedb_30"), "dali": False},
    "wf42m_pfc03_32gpu_r18": {**BASE, "network": "r18", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                              "sample_rate": 0.3, "fp16": True, "lr": 0.4, "weight_decay": 0.0005, "batch_size": 128,
                              "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                              "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                              "agedb_30"), "dali": False},
    "wf42m_pfc03_32gpu_r200": {**BASE, "network": "r200", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                               "sample_rate": 0.3, "fp16": True, "lr": 0.4, "weight_decay": 0.0005, "batch_size": 128,
                               "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                               "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                               "agedb_30"), "dali": False},
    "wf42m_pfc03_32gpu_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512,
                              "sample_rate": 0.3, "fp16": True, "lr": 0.4, "weight_decay": 0.0005, "batch_size": 128,
                              "num_epoch": 20, "warmup_epoch": 2, "rec": "/train_tmp/WebFace42M",
                              "num_classes": 2059906, "num_image": 42474557, "val_targets": ("lfw", "cfp_fp",
                              "agedb_30"), "dali": False},
    "wf42m_pfc03_40epoch_64gpu_vit_b": {**BASE, "network": "vit_b_dp005_mask_005", "margin_list": (1.0, 0.0, 0.4),
                                        "embedding_size": 512, "sample_rate": 0.3, "fp16": True, "optimizer": "adamw",
                                        "lr": 0.001, "weight_decay": 0.1, "batch_size": 384, "num_epoch": 40,
                                        "warmup_epoch": 4, "rec": "/train_tmp/WebFace42M", "num_classes": 2059906,
                                        "num_image": 42474557, "val_targets": (), "dali": False},
    "wf42m_pfc03_40epoch_64gpu_vit_l": {**BASE, "network": "vit_l_dp005_mask_005", "margin_list": (1.0, 0.0, 0.4),
                                        "embedding_size": 512, "sample_rate": 0.3, "fp16": True, "optimizer": "adamw",
                                        "lr": 0.001, "weight_decay": 0.1, "batch_size": 384, "num_epoch": 40,
                                        "warmup_epoch": 4, "rec": "/train_tmp/WebFace42M", "num_classes": 2059906,
                                        "num_image": 42474557, "val_targets": (), "dali": False},
    "wf42m_pfc03_40epoch_64gpu_vit_s": {**BASE, "network": "vit_s_dp005_mask_0", "margin_list": (1.0, 0.0, 0.4),
                                        "embedding_size": 512, "sample_rate": 0.3, "fp16": True, "optimizer": "adamw",
                                        "lr": 0.001, "weight_decay": 0.1, "batch_size": 384, "num_epoch": 40,
                                        "warmup_epoch": 4, "rec": "/train_tmp/WebFace42M", "num_classes": 2059906,
                                        "num_image": 42474557, "val_targets": (), "dali": False},
    "wf42m_pfc03_40epoch_64gpu_vit_t": {**BASE, "network": "vit_t_dp005_mask0", "margin_list": (1.0, 0.0, 0.4),
                                        "embedding_size": 512, "sample_rate": 0.3, "fp16": True, "optimizer": "adamw",
                                        "lr": 0.001, "weight_decay": 0.1, "batch_size": 384, "num_epoch": 40,
                                        "warmup_epoch": 4, "rec": "/train_tmp/WebFace42M", "num_classes": 2059906,
                                        "num_image": 42474557, "val_targets": (), "dali": False},
    "wf42m_pfc03_40epoch_8gpu_vit_b": {**BASE, "network": "vit_b_dp005_mask_005", "margin_list": (1.0, 0.0, 0.4),
                                       "embedding_size": 512, "sample_rate": 0.3, "fp16": True, "optimizer": "adamw",
                                       "lr": 0.001, "weight_decay": 0.1, "batch_size": 256, "gradient_acc": 12,
                                       "num_epoch": 40, "warmup_epoch": 4, "rec": "/train_tmp/WebFace42M",
                                       "num_classes": 2059906, "num_image": 42474557, "val_targets": (),
                                       "dali": False},
    "wf42m_pfc03_40epoch_8gpu_vit_t": {**BASE, "network": "vit_t_dp005_mask0", "margin_list": (1.0, 0.0, 0.4),
                                       "embedding_size": 512, "sample_rate": 0.3, "fp16": True, "optimizer": "adamw",
                                       "lr": 0.001, "weight_decay": 0.1, "batch_size": 512, "num_epoch": 40,
                                       "warmup_epoch": 4, "rec": "/train_tmp/WebFace42M", "num_classes": 2059906,
                                       "num_image": 42474557, "val_targets": (), "dali": False},
    "wf4m_mbf": {**BASE, "network": "mbf", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512, "sample_rate": 1.0,
                 "fp16": True, "lr": 0.1, "weight_decay": 0.0001, "batch_size": 128, "num_epoch": 20,
                 "warmup_epoch": 0, "rec": "/train_tmp/WebFace4M", "num_classes": 205990, "num_image": 4235242,
                 "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "wf4m_r100": {**BASE, "network": "r100", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512, "sample_rate": 1.0,
                  "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20,
                  "warmup_epoch": 0, "rec": "/train_tmp/WebFace4M", "num_classes": 205990, "num_image": 4235242,
                  "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
    "wf4m_r50": {**BASE, "network": "r50", "margin_list": (1.0, 0.0, 0.4), "embedding_size": 512, "sample_rate": 1.0,
                 "fp16": True, "lr": 0.1, "weight_decay": 0.0005, "batch_size": 128, "num_epoch": 20,
                 "warmup_epoch": 0, "rec": "/train_tmp/WebFace4M", "num_classes": 205990, "num_image": 4235242,
                 "val_targets": ("lfw", "cfp_fp", "agedb_30"), "dali": False},
}


def expected(recipe: dict) -> dict:
    """The recipe under this project's keys."""
    name, drop_path, mask_ratio = NETWORKS.get(recipe["network"], (recipe["network"], ABSENT, ABSENT))
    m1, m2, m3 = recipe["margin_list"]
    synthetic = recipe["rec"] == "synthetic"
    return {
        "backbone.name": name,
        "backbone.drop_path": drop_path,
        "backbone.mask_ratio": mask_ratio,
        "margin.m1": m1,
        "margin.m2": m2,
        "margin.m3": m3,
        "embedding_size": recipe["embedding_size"],
        "pfc.rate": recipe["sample_rate"],
        "margin.interclass_filtering_threshold": recipe["interclass_filtering_threshold"],
        "trainer.precision": "fp16" if recipe["fp16"] else "fp32",
        "optimizer._target_": OPTIMIZERS[recipe["optimizer"]],
        "optimizer.lr": recipe["lr"],
        "optimizer.weight_decay": recipe["weight_decay"],
        # The reference's SGD always runs with momentum 0.9 (its config value is not read); AdamW has none.
        "optimizer.momentum": 0.9 if recipe["optimizer"] == "sgd" else ABSENT,
        "trainer.batch_size": recipe["batch_size"],
        "trainer.num_epoch": recipe["num_epoch"],
        "trainer.warmup_epoch": max(recipe["warmup_epoch"], 0),  # the reference's -1 (3millions) warms up never
        "trainer.gradient_acc": recipe["gradient_acc"],
        "dataset.name": DATASETS[recipe["rec"]],
        "dataset.num_classes": recipe["num_classes"],
        # Synthetic identities hold num_classes x images_per_class images; the reference's synthetic epoch is
        # num_image long whatever its data, so there the image count has no key to match.
        "dataset.num_image": ABSENT if synthetic else recipe["num_image"],
        "dataset.val": sorted(recipe["val_targets"]),
        "dataset.loader": ABSENT if synthetic else ("dali" if recipe["dali"] else "torch"),
    }


def compose_preset(preset: str, *overrides: str):
    return compose_config([f"experiment={preset}", "tracking=none", *overrides])


# Every reference config and every preset file but the CPU demos (demo, demo_<family>): a name missing on either side
# fails its case below.
PRESETS = sorted(set(TABLE) | {p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith("demo")})


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_to_the_reference_recipe(preset):
    assert preset in TABLE, f"conf/experiment/{preset}.yaml is named after no reference config"
    want = expected(TABLE[preset])
    cfg = compose_preset(preset)
    got = {key: OmegaConf.select(cfg, key, default=ABSENT) for key in want}
    got["dataset.val"] = sorted(cfg.dataset.val)
    assert got == want


def test_pair_sets_load_from_the_dataset_folder():
    cfg = compose_preset("wf42m_pfc03_32gpu_r50", "dataset.root=/data/wf42m")
    assert {name: (node._target_, node.path) for name, node in cfg.dataset.val.items()} == {
        name: ("arcface.evaluation.load_pair_set", f"/data/wf42m/{name}.bin") for name in PAIR_SETS}
