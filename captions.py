"""Captions for text-to-image models: prompt files, MS-COCO image-caption pairs, the CLIP score.

What distilling and evaluating Stable Diffusion needs besides the model (latent.py): the prompts
a student is distilled with (SFD Sec. 3.4 and Table 6: MS-COCO captions, guidance 1), Meng et
al.'s captioned training images (Alg. 1's x ~ D for a text model: image through the VAE, caption
through CLIP), and the evaluation of SFD Table 5: FID-5K against MS-COCO val images (fid.py, on
the subset written here) and the CLIP score with open_clip's ViT-g-14 (an optional package).

    python captions.py coco-subset --images val2014 --captions captions_val2014.json --outdir coco5k \\
        --prompts-out coco5k.txt     # 5000 centre-cropped 512 px reference images and their captions
    python captions.py clip-score --images sd.npz --prompts coco5k.txt
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

import cli
import latent
import model_cards


def read_captions(path, flag='--captions'):
    """The prompts of a file: one per line, MS-COCO's captions JSON (.json, 'annotations'[*]['caption'])
    or a .csv with a 'text' column (SFD's MS-COCO_val2014_30k_captions.csv); blank ones dropped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'{flag} {path}: no such file')
    try:
        if path.suffix == '.json':
            out = [a['caption'] for a in json.loads(path.read_text()).get('annotations', [])]
        elif path.suffix == '.csv':
            import csv
            with open(path, newline='') as f:
                out = [row.get('text') or '' for row in csv.DictReader(f)]
        else:
            out = path.read_text().splitlines()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f'{flag} {path}: unreadable ({type(e).__name__}: {e})') from None
    out = [str(p).strip() for p in out if str(p).strip()]
    if not out:
        raise ValueError(f"{flag} {path}: no prompts found (one per line, COCO captions .json, or .csv "
                         "with a 'text' column)")
    return out


def training_prompts(net, captions, flag='--captions'):
    """The prompts a text model is distilled with (read_captions), None for other models; one error
    when a text model has no captions file or another model gets one."""
    if net.text and not captions:
        raise ValueError(f'{flag}: this model is text-conditioned: give a captions file (one prompt per '
                         'line, MS-COCO captions .json or .csv)')
    if captions and not net.text:
        raise ValueError(f'{flag} {captions}: this model takes no prompts')
    return read_captions(captions, flag) if net.text else None


def coco_pairs(captions, images, first_only=False):
    """(image path, caption) pairs of an MS-COCO captions JSON ('images' [{id, file_name}] under the
    folder `images`, 'annotations' [{image_id, caption}]), in image-id order: every caption, or
    the first caption of each image (`first_only`)."""
    try:
        d = json.loads(Path(captions).read_text())
        files = {im['id']: Path(images) / im['file_name'] for im in d['images']}
        pairs = [(files[a['image_id']], a['caption'].strip()) for a in
                 sorted(d['annotations'], key=lambda a: (a['image_id'], a.get('id', 0)))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'--captions {captions}: not an MS-COCO captions JSON with images and annotations '
                         f'({type(e).__name__}: {e})') from None
    if first_only:  # keep each image's first caption: a dict keeps the last write, so go in reverse
        pairs = list({str(f): (f, c) for f, c in reversed(pairs)}.values())[::-1]
    if not pairs or not pairs[0][0].is_file():
        raise ValueError(f'--data {images}: {pairs[0][0] if pairs else "no image"} not found (the folder of '
                         f'the images that {captions} names)')
    return pairs


def load_image(path, size):
    """An image as float [3, size, size] in [-1, 1]: the shorter side resized to `size` (bicubic),
    then the centre crop (as diffusers' training scripts and text-to-image FID set-ups do)."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert('RGB')
        # Shorter side to `size` (the longer one scaled alike), then the central size x size square.
        s = size / min(im.size)
        im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
    # HWC uint8 -> CHW float in [-1, 1]
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1


def caption_data(net, images, captions):
    """draw(n, generator) -> (x0 [n, *net.shape], {'encoder_hidden_states': [n, L, D]}): Meng Alg. 1's
    x ~ D for a text model, n random (image, caption) pairs of MS-COCO-style data (`coco_pairs`),
    the images through the VAE (a posterior draw) and the captions through CLIP, on net's device."""
    if net.vae is None or not net.text:
        raise ValueError('captioned training data are for text-to-image latent models (VAE, text encoder)')
    pairs, size = coco_pairs(captions, images), net.image_shape[1]

    def draw(n, g):
        # Meng Alg. 1, line 2: (x, c) ~ D, here n pairs drawn with replacement by the run's generator.
        idx = torch.randint(len(pairs), (n,), generator=g).tolist()
        dev = next(net.parameters()).device
        x = torch.stack([load_image(pairs[i][0], size) for i in idx]).to(dev)
        # The VAE's posterior draw: its noise from a seed drawn from the same generator (net's device).
        seed = int(torch.randint(2 ** 62, (), generator=g))
        with torch.no_grad():
            x0 = net.encode(x, generator=torch.Generator(dev).manual_seed(seed))
        return x0, {'encoder_hidden_states': net.encode_prompts([pairs[i][1] for i in idx])}
    return draw


CLIP = ('ViT-g-14', 'laion2b_s34b_b88k')  # open_clip model and weights of SFD's clip_score.py (Sec. 4.1)


def load_clip(device='cpu', name=CLIP[0], pretrained=CLIP[1]):
    """(model, preprocess, tokenizer) from open_clip, an optional package (downloads its weights once)."""
    try:
        import open_clip
    except ImportError as e:
        raise latent.MissingExtra(f'the CLIP score needs open_clip: pip install open_clip_torch (it needs '
                           f'torchvision) ({e})') from None
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_score(images, prompts, clip=None, batch=64, device='cpu'):
    """The CLIP score: cos(f_image(x_i), f_text(c_i)), image i with prompt i, averaged over i. SFD
    Table 5 prints this mean (0.29 ...); sfd-main's clip_score.py prints 100 times it. images: uint8
    [N, 3, H, W]; clip: (model, preprocess, tokenizer), default `load_clip(device)` (ViT-g-14)."""
    from PIL import Image
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(prompts) or not len(prompts):
        raise ValueError(f'need uint8 images [N, 3, H, W] and N prompts, got {images.dtype} '
                         f'{list(images.shape)} and {len(prompts)} prompts')
    model, preprocess, tokenizer = clip or load_clip(device)
    total = 0.0
    for i in range(0, len(images), batch):  # image i is compared with prompt i only
        pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images[i:i + batch]]
        f_img = model.encode_image(torch.stack([preprocess(im) for im in pil]).to(device)).double()
        f_txt = model.encode_text(tokenizer(list(prompts[i:i + batch])).to(device)).double()
        # Each pair's cosine: both embeddings unit length, their dot product per row.
        cos = (f_img / f_img.norm(dim=-1, keepdim=True) * (f_txt / f_txt.norm(dim=-1, keepdim=True))).sum(-1)
        total += float(cos.sum())
    return total / len(images)



def main(argv=None):
    """`python captions.py clip-score ...`, `python captions.py coco-subset ...` (see the module doc)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ('clip-score', 'coco-subset'):
        raise ValueError('usage: python captions.py clip-score ... | coco-subset ... '
                         '(see python captions.py -h)'
                         if argv[:1] not in (['-h'], ['--help']) else __doc__)
    p = cli.parser(__doc__, prog=f'captions.py {argv[0]}')
    if argv[0] == 'clip-score':
        p.add_argument('--images', required=True, help="uint8 NHWC images under 'images' (sample.py --npz)")
        p.add_argument('--prompts', required=True, help='the prompts given to sample.py (image i: prompt i)')
        p.add_argument('--batch', type=int, default=64)
        p.add_argument('--device', default='auto')
        p.add_argument('--card', help="a student's folder: put the score into its model card README.md")
        p.add_argument('--card-nfe', type=int, help='with --card: the NFE the images were sampled at')
        args = p.parse_args(argv[1:])
        if not Path(args.images).is_file():
            raise ValueError(f'--images {args.images}: no such file (write it with sample.py --npz)')
        if args.card:
            model_cards.read_card(args.card)  # a card to write into, before the network runs
        with np.load(args.images) as f:
            images = torch.from_numpy(f['images']).permute(0, 3, 1, 2)
        prompts = read_captions(args.prompts, '--prompts')
        score = clip_score(images, [prompts[i % len(prompts)] for i in range(len(images))], batch=args.batch,
                           device=cli.device(args.device))
        print(f'CLIP score ({CLIP[0]}, {CLIP[1]}), {len(images)} images: {score:.4f} '
              f'(x100: {100 * score:.2f})')
        if args.card:  # the card records the score with how it was measured
            protocol = f'open_clip {CLIP[0]} ({CLIP[1]}), mean cosine, {len(images)} images of ' \
                       f'{Path(args.prompts).name}'
            model_cards.add_metric(args.card, 'clip-score', score, 'CLIP score', protocol, nfe=args.card_nfe)
        return
    # coco-subset: the reference images of SFD Sec. 4.1's FID-5K and their prompts, one per image.
    p.add_argument('--images', required=True, help='the MS-COCO image folder, e.g. val2014/')
    p.add_argument('--captions', required=True, help='its captions JSON, e.g. captions_val2014.json')
    p.add_argument('--num', type=int, default=5000)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--outdir', required=True, help='the reference images for fid.py ref --data')
    p.add_argument('--prompts-out', required=True, help='their first captions, one per line, for sample.py')
    args = p.parse_args(argv[1:])
    from PIL import Image
    pairs = coco_pairs(args.captions, args.images, first_only=True)[:args.num]
    for i, (path, _) in enumerate(pairs):  # the first `num` images by id, centre-cropped and resized
        out = Path(args.outdir) / f'{i:06d}.png'
        out.parent.mkdir(parents=True, exist_ok=True)
        x = ((load_image(path, args.size) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(out)
    Path(args.prompts_out).write_text(''.join(' '.join(c.split()) + '\n' for _, c in pairs))
    print(f'wrote {len(pairs)} images to {args.outdir} and their captions to {args.prompts_out}')


if __name__ == '__main__':
    cli.run(main)
