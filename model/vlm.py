"""The composition: vision encoder -> projector -> language model. This file only wires the three together.

Each image's visual tokens are its features through the projector: for `llava`, one encoder-sized view of the
image; for `llava_next`, a grid of tiles plus the whole image, packed as model/anyres.py says; for `qwen2_vl`, the
image at its own resolution through Qwen2-VL's tower and patch merger (model/qwen2_vision.py), placed with M-RoPE
positions (model/mrope.py); for `idefics3`, the tiles of model/idefics3.py's split through a SigLIP tower (its
post-LayerNorm applied) and the pixel shuffle, laid out with the tile tags the image's token layout holds; for
`gemma3`, one SigLIP view average-pooled (model/projector.py) into a Gemma 3 LM (model/gemma3_text.py). A model
with an audio tower (model/audio.py: qwen2_audio's, or one beside a vision tower) turns each clip's mel features into
audio tokens the same way, placed at its own placeholder id (`audio.audio_token_index`). What a family builds and
which entry point encodes its images is its spec's (model/registry.py `FamilySpec`, one file per family in
model/families/).

Images enter the prompt in one of two ways:
- at the placeholder: the prompt carries `image_token_index` once per visual token (LLaVA); those positions take
  the visual tokens, in order;
- prepended: a prompt with no placeholder gets its visual tokens in front of the text,
  `torch.cat([vision_embeddings, text_embeddings], dim=1)`, with positions and the attention mask extended to match.
"""

from __future__ import annotations

import torch
from torch import nn

from .anyres import Anyres, Layout
from .audio import AudioTower
from .config import VLMConfig
from .gemma3_text import Gemma3TextModel
from .idefics3 import bucket_positions
from .projector import build_projector
from .qwen2_vision import Grid, Qwen2VisionConfig, Qwen2VisionTower
from .text import TextModel
from .vision import VisionTransformer


class VisionLanguageModel(nn.Module):
    def __init__(self, config: VLMConfig, *, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        spec = config.spec  # what the family builds (model/registry.py, model/families/)
        lm_class = Gemma3TextModel if config.text.model_type == "gemma3_text" else TextModel
        self.language_model = lm_class(config.text, max_positions=max_positions)
        # Gemma 3: an image's tokens attend to each other both ways in prefill (the runner passes the spans)
        self.bidirectional_images = spec.bidirectional_images
        self.features = spec.features  # read here, not in forward: a compiled tower traces no registry lookup
        self.anyres: Anyres | None = None
        self.qwen2_vision: Qwen2VisionConfig | None = None
        self.audio: AudioTower | None = None
        if config.audio is not None:
            self.audio = AudioTower(config.audio, llm_dim=config.text.hidden_size)
        if config.vision is None:  # qwen2_audio: audio only
            return
        if isinstance(config.vision, Qwen2VisionConfig):  # qwen2_vl: its tower ends in the merger (no projector)
            self.qwen2_vision = config.vision
            self.visual = Qwen2VisionTower(config.vision)
            return
        self.vision_tower = VisionTransformer(config.vision)
        self.multi_modal_projector = build_projector(
            config.projector, vision_dim=config.vision_feature_dim, llm_dim=config.text.hidden_size
        )
        if spec.anyres is not None:  # llava_next / onevision: the family's tiling
            self.anyres = spec.anyres(config)
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))  # (D,) after each grid row

    # -- vision ---------------------------------------------------------------------------------------------------
    def select_features(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        """LLaVA's feature selection: the configured layer(s), CLS dropped by `default`, layers concatenated."""
        features = self.features
        if features == "normed_bucketed":  # idefics3: the last layer after the post-LayerNorm, patches bucketed
            v = self.config.vision
            assert v is not None and not isinstance(v, Qwen2VisionConfig)
            positions = bucket_positions(v.image_size // v.patch_size, pixel_values.shape[-1] // v.patch_size)
            last = self.vision_tower(pixel_values, (-1,), positions.to(pixel_values.device))[0]  # (N, P, Dv)
            return self.vision_tower.post_layernorm(last)  # (N, P, Dv)
        if features == "normed":  # gemma3: SigLIP's last_hidden_state, after its post-LayerNorm
            return self.vision_tower.post_layernorm(self.vision_tower(pixel_values, (-1,))[0])  # (N, P, Dv)
        states = self.vision_tower(pixel_values, self.config.feature_layers)  # [(N, T, Dv)] per layer
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)  # (N, P, Dv * layers)

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:  # (N, P, Dv)
        """Visual tokens in the LM's embedding space."""
        return self.multi_modal_projector(vision_features)  # (N, N_vis, D)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        return self.project(self.select_features(pixel_values))  # (N, N_vis, D)

    def encode_patches(self, patches: torch.Tensor, grids: list[Grid]) -> list[torch.Tensor]:
        """qwen2_vl: the patches (N, C*T*P*P) of several images side by side and their (t, h, w) grids -> each
        image's visual tokens (t*h*w / m^2, D)."""
        return self.visual(patches, grids)

    def encode_tiled(self, pixel_values: torch.Tensor, layouts: list[Layout]) -> list[torch.Tensor]:
        """llava_next: (N, T, C, H, W) tiles of N images with the same number of tiles T and their layouts -> each
        image's visual tokens (n_i, D), one encoder call for all tiles."""
        assert self.anyres is not None
        n, t = pixel_values.shape[:2]
        features = self.encode_images(pixel_values.flatten(0, 1))  # (N * T, S*S, D)
        per_image = features.view(n, t, *features.shape[1:])  # (N, T, S*S, D)
        return [self.anyres.pack(f, layout, self.image_newline) for f, layout in zip(per_image, layouts, strict=True)]

    def encode_split(self, pixel_values: torch.Tensor, token_layouts: list[torch.Tensor]) -> list[torch.Tensor]:
        """idefics3: the tiles (sum T_i, C, H, W) of several images side by side and each image's token layout
        (L_i,) ids, its `<image>` slots at image_token_index -> each image's rows (L_i, D): the layout's own token
        embeddings with the visual tokens in its slots, in order (transformers' `inputs_merger`)."""
        features = self.encode_images(pixel_values)  # (sum T_i, S, D)
        flat = features.reshape(-1, features.shape[-1])  # (sum T_i * S, D)
        out, done = [], 0
        for ids in token_layouts:
            slots = ids == self.config.image_token_index  # (L,)
            n = int(slots.sum())
            rows = self.embed_tokens(ids[None])[0]  # (L, D)
            out.append(rows.masked_scatter(slots[:, None], flat[done : done + n].to(rows.dtype)))  # (L, D)
            done += n
        if done != flat.shape[0]:
            raise ValueError(f"the token layouts hold {done} image slots but the tiles give {flat.shape[0]} tokens")
        return out

    def encode_audio(self, features: torch.Tensor, frames: list[int]) -> list[torch.Tensor]:  # (N, M, F)
        """Each clip's audio tokens (num_tokens(frames_i), D) from its padded mel features and valid frames."""
        if self.audio is None:
            raise ValueError("this model has no audio tower")
        return self.audio(features, frames)

    # -- text + images ----------------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T)
        """Token embeddings; ids outside the vocabulary (a placeholder id may be) embed as id 0. A placeholder id
        inside it embeds as itself, as transformers does: the image rows are overwritten by visual tokens anyway, and
        a model that generates its image token must read it back as that token."""
        ids = input_ids.masked_fill(input_ids >= self.language_model.embed_tokens.num_embeddings, 0)
        return self.language_model.embed_tokens(ids)  # (B, T, D)

    def merge_at_placeholders(
        self,
        input_ids: torch.Tensor,  # (B, T)
        text_embeds: torch.Tensor,  # (B, T, D)
        visual_tokens: torch.Tensor,  # (N_img, N_vis, D) in prompt order
    ) -> torch.Tensor:
        """Put the visual tokens where the prompt's placeholders stand, image after image."""
        mask = input_ids == self.config.image_token_index  # (B, T)
        n_slots, n_tokens = int(mask.sum()), visual_tokens.shape[0] * visual_tokens.shape[1]
        if n_slots != n_tokens:
            raise ValueError(f"the prompt has {n_slots} image placeholder tokens but the images give {n_tokens}")
        flat = visual_tokens.reshape(-1, visual_tokens.shape[-1]).to(text_embeds.dtype)  # (N_img * N_vis, D)
        return text_embeds.masked_scatter(mask[..., None], flat)  # (B, T, D)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        vision_features: torch.Tensor | None = None,  # (B_img, P, Dv)
        *,
        pixel_values: torch.Tensor | None = None,  # (B_img, C, H, W)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        positions: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:
        """Logits (B, T_total, V), where T_total = N_vis + T when the visual tokens are prepended, else T.

        Give `vision_features` (already encoded patches) or `pixel_values` (encoded here), or neither for text only.
        Without placeholders in `input_ids`, each sequence gets one image's visual tokens in front of its text.
        """
        if vision_features is not None and pixel_values is not None:
            raise ValueError("pass vision_features or pixel_values, not both")
        if not self.config.spec.dense_forward and (vision_features is not None or pixel_values is not None):
            raise ValueError(f"{self.config.family} images go through the engine (their token layouts and attention "
                             "masks are the runner's), not this dense forward")
        embeds = self.embed_tokens(input_ids)  # (B, T, D)
        if vision_features is None and pixel_values is None:
            return self.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask)
        if pixel_values is not None:
            vision_features = self.select_features(pixel_values)  # (B_img, P, Dv)
        visual = self.project(vision_features)  # (B_img, N_vis, D)
        if bool((input_ids == self.config.image_token_index).any()):
            embeds = self.merge_at_placeholders(input_ids, embeds, visual)
        else:
            embeds, attention_mask, positions = self._prepend(embeds, visual, attention_mask, positions)
        return self.language_model(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask)

    @staticmethod
    def _prepend(
        embeds: torch.Tensor,  # (B, T, D)
        visual: torch.Tensor,  # (B, N_vis, D)
        attention_mask: torch.Tensor | None,  # (B, T)
        positions: torch.Tensor | None,  # (B, T)
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Concatenate visual tokens in front of the text; shift positions and extend the mask to match."""
        b, n_vis = embeds.shape[0], visual.shape[1]
        if visual.shape[0] != b:
            raise ValueError(f"prepending needs one image per sequence: {visual.shape[0]} images for {b} sequences")
        combined = torch.cat([visual.to(embeds.dtype), embeds], dim=1)  # (B, N_vis + T, D)
        if attention_mask is not None:
            ones = attention_mask.new_ones(b, n_vis)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, N_vis + T)
        if positions is not None:
            start = positions[:, :1]  # (B, 1)
            head = start + torch.arange(n_vis, device=positions.device)[None, :]  # (B, N_vis)
            positions = torch.cat([head, positions + n_vis], dim=1)  # (B, N_vis + T)
        return combined, attention_mask, positions
