"""An independent, deliberately plain re-statement of the authors' HSNet forward pass, for tests.

It follows the authors' structure rather than this project's: one 1-shot call per support image with
the query backbone recomputed each time, a center-pivot conv that prunes support positions with
index_select, per-feature mask interpolation, and the vote written as in their predict_mask_nshot.
It reuses only the parameters (the modules holding the weights) of the model under test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cp_conv4d(conv4d, x):
    """Center-pivot conv the authors' way: index_select pruning, permutes, two Conv2d calls."""
    s = conv4d.support_stride
    bsz, ch, ha, wa, hb, wb = x.shape
    if s > 1:
        idxh = torch.arange(0, hb, s)
        idxw = torch.arange(0, wb, s)
        idx = (idxw.repeat(len(idxh), 1) + idxh.repeat(len(idxw), 1).t() * wb).view(-1)
        pruned = x.reshape(bsz, ch, ha, wa, -1).index_select(4, idx).view(bsz, ch, ha, wa, len(idxh), len(idxw))
    else:
        pruned = x
    _, _, _, _, phb, pwb = pruned.shape
    o1 = conv4d.conv1(pruned.permute(0, 4, 5, 1, 2, 3).contiguous().view(-1, ch, ha, wa))
    o1 = o1.view(bsz, phb, pwb, -1, ha, wa).permute(0, 3, 4, 5, 1, 2)
    o2 = conv4d.conv2(x.permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, ch, hb, wb))
    o2 = o2.view(bsz, ha, wa, -1, o2.shape[-2], o2.shape[-1]).permute(0, 3, 1, 2, 4, 5)
    return o1 + o2


def block(seq, x):
    for i in range(0, len(seq), 3):
        x = cp_conv4d(seq[i], x)
        gn = seq[i + 1]
        x = F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)
        x = torch.relu(x)
    return x


def interp_query_dims(x, size):
    bsz, ch, ha, wa, hb, wb = x.shape
    y = x.permute(0, 4, 5, 1, 2, 3).contiguous().view(bsz * hb * wb, ch, ha, wa)
    y = F.interpolate(y, size, mode="bilinear", align_corners=True)
    return y.view(bsz, hb, wb, ch, size[0], size[1]).permute(0, 3, 4, 5, 1, 2).contiguous()


def learner(hpn, corrs):
    s4 = block(hpn.encoder_layer4, corrs[0])
    s3 = block(hpn.encoder_layer3, corrs[1])
    s2 = block(hpn.encoder_layer2, corrs[2])
    m43 = block(hpn.encoder_layer4to3, interp_query_dims(s4, s3.shape[2:4]) + s3)
    m432 = block(hpn.encoder_layer3to2, interp_query_dims(m43, s2.shape[2:4]) + s2)
    bsz, ch, ha, wa, _, _ = m432.shape
    enc = m432.reshape(bsz, ch, ha, wa, -1).mean(dim=-1)
    dec = hpn.decoder1(enc)
    dec = F.interpolate(dec, (dec.shape[-1] * 2,) * 2, mode="bilinear", align_corners=True)
    return hpn.decoder2(dec)


def one_shot(model, query_img, support_img, support_mask, mask_support=True):
    qf = model.backbone.hypercolumns(query_img)
    sf = model.backbone.hypercolumns(support_img)
    if mask_support:
        sf = [f * F.interpolate(support_mask.unsqueeze(1).float(), f.shape[2:], mode="bilinear",
                                align_corners=True) for f in sf]
    corrs = []
    for q, s in zip(qf, sf):
        bsz, ch, hb, wb = s.shape
        s = s.view(bsz, ch, -1)
        s = s / (s.norm(dim=1, p=2, keepdim=True) + 1e-5)
        _, _, ha, wa = q.shape
        q = q.view(bsz, ch, -1)
        q = q / (q.norm(dim=1, p=2, keepdim=True) + 1e-5)
        corrs.append(torch.bmm(q.transpose(1, 2), s).view(bsz, ha, wa, hb, wb).clamp(min=0))
    n4, n3, _ = model.backbone.stage_sizes
    c4 = torch.stack(corrs[-n4:]).transpose(0, 1).contiguous()
    c3 = torch.stack(corrs[-(n4 + n3):-n4]).transpose(0, 1).contiguous()
    c2 = torch.stack(corrs[: -(n4 + n3)]).transpose(0, 1).contiguous()
    logit = learner(model.hpn_learner, [c4, c3, c2])
    return F.interpolate(logit, support_img.shape[2:], mode="bilinear", align_corners=True)


def authors_forward(model, query_img, support_imgs, support_masks):
    """Returns per-shot logits (B, K, 2, H, W) and the K-shot vote mask (B, H, W)."""
    k = support_imgs.shape[1]
    logits, agg = [], 0
    for s in range(k):
        logit = one_shot(model, query_img, support_imgs[:, s], support_masks[:, s], model.mask_support)
        logits.append(logit)
        agg = agg + logit.argmax(dim=1)
    bsz = agg.shape[0]
    max_vote = agg.view(bsz, -1).max(dim=1)[0]
    max_vote = torch.stack([max_vote, torch.ones_like(max_vote)]).max(dim=0)[0].view(bsz, 1, 1)
    pred = agg.float() / max_vote
    pred = (pred >= 0.5).float()
    return torch.stack(logits, dim=1), pred
