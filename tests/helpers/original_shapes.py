"""State-dict key names and shapes of the original STiL/TIP encoders, written by hand from the
originals' layouts (torchvision ResNet; TIP's tabular transformer), never from our modules: the
converter tests build fake original checkpoints from them, the encoder tests check our key layout."""


def resnet_shapes(block: str, layers, channels, stem=64, in_ch=3):
    shapes = {"conv1.weight": (stem, in_ch, 7, 7)}

    def bn(prefix, n):
        shapes.update({f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,), f"{prefix}.running_var": (n,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", stem)
    inplanes, exp = stem, (4 if block == "bottleneck" else 1)
    for li, (n_blocks, width) in enumerate(zip(layers, channels), start=1):
        for b in range(n_blocks):
            p = f"layer{li}.{b}"
            stride = 2 if (li > 1 and b == 0) else 1
            if block == "bottleneck":
                shapes[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
                bn(f"{p}.bn1", width)
                shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
                bn(f"{p}.bn2", width)
                shapes[f"{p}.conv3.weight"] = (width * 4, width, 1, 1)
                bn(f"{p}.bn3", width * 4)
            else:
                shapes[f"{p}.conv1.weight"] = (width, inplanes, 3, 3)
                bn(f"{p}.bn1", width)
                shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
                bn(f"{p}.bn2", width)
            if b == 0 and (stride != 1 or inplanes != width * exp):
                shapes[f"{p}.downsample.0.weight"] = (width * exp, inplanes, 1, 1)
                bn(f"{p}.downsample.1", width * exp)
            inplanes = width * exp
    return shapes


def tabular_shapes(lengths, d, layers):
    cat = [x for x in lengths if x != 1]
    shapes = {
        "cls_token": (1, 1, d),
        "mask_special_token": (1, 1, d),
        "cat_embedding.weight": (sum(cat), d),
        "con_proj.weight": (d, 1),
        "con_proj.bias": (d,),
        "column_embedding.weight": (len(lengths) + 1, d),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(layers):
        p = f"transformer_blocks.{i}"
        shapes.update({
            f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,),
            f"{p}.attn.qkv.weight": (3 * d, d),
            f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
            f"{p}.norm2.weight": (d,), f"{p}.norm2.bias": (d,),
            f"{p}.mlp.fc1.weight": (4 * d, d), f"{p}.mlp.fc1.bias": (4 * d,),
            f"{p}.mlp.fc2.weight": (d, 4 * d), f"{p}.mlp.fc2.bias": (d,),
        })
    return shapes
