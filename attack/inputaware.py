"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generator network makes a different trigger for every
image, stamped through a sparse mask from a second network; "cross" samples, stamped with another image's trigger,
keep their labels, so a trigger works only on the image it was made for.

    python attack/inputaware.py --yaml_path config/attack/prototype/cifar10.yaml \
        --bd_yaml_path config/attack/inputaware/default.yaml --save_folder_name inputaware_0_1

As BackdoorBench: the mask generator is trained alone first (--mask_epochs, BackdoorBench's clean_train_epochs:
sparsity + diversity losses), then frozen; then the classifier and the pattern generator train together, every batch
holding int(pratio * batch) backdoor samples (own trigger, backdoor label), as many cross samples and clean ones,
with the pattern diversity loss. The classifier follows the prototype recipe (--lr, --lr_scheduler, ...) in place of
BackdoorBench's lr_C / schedulerC. The record's poisoned images are made with the trained generators afterwards.
"""
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python attack/inputaware.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from utils.attack_run import DynamicAttack, attack_parser, parse_attack_args, run_attack
from utils.datasets import dataset_info
from utils.errors import UserError, run_cli
from utils.generators import blend, diversity_loss, input_aware_generators, threshold
from utils.models import cpu_state_dict, load_weights
from utils.poisoning import backdoor_labels, batch_poison_count
from utils.safe_pickle import safe_torch_load
from utils.tensor_data import Augmentation, DeviceImages
from utils.precision import autocast, grad_scaler
from utils.training import TrainingRecipe, keep_freed_memory, prepare_model
from utils.triggers import to_uint8

GENERATORS_FILE = "netCGM.pt"  # BackdoorBench's name for its netC / netG / netM checkpoint


def paired_batches(data, batch_size, augment, generator):
    """Two independently shuffled, augmented passes over `data`, zipped (BackdoorBench's two train loaders): the
    second supplies the other images that cross samples and the diversity losses need."""
    return zip(data.batches(batch_size, shuffle=True, augment=augment, generator=generator, with_extra=True),
               data.batches(batch_size, shuffle=True, augment=augment, generator=generator))


def optimizer_step(loss, optimizers, scaler, clip=None):
    """Backward and one step of every optimizer, through the GradScaler when there is one; clip = (parameters,
    max_norm) clips those gradients first."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizers[0])
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(*clip)
    for optimizer in optimizers:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    if scaler is not None:
        scaler.update()


class InputAware(DynamicAttack):
    name = "inputaware"

    def __init__(self, args):
        super().__init__(args)
        self.info = dataset_info(args.dataset)
        self.device = torch.device("cpu")
        self.netG, self.netM = input_aware_generators(args.dataset, self.info.img_size[2])
        self.model = None
        self.epochs_done = 0

    # ------------------------------------------------------------------ training
    def train(self, model, train_images, train_labels, args, device, logger):
        info = self.info
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.netG, self.netM = prepare_model(self.netG, self.device), prepare_model(self.netM, self.device)
        bd_labels = backdoor_labels(train_labels, args.attack_label_trans, args.attack_target, info.num_classes)
        data = DeviceImages(train_images, train_labels, self.device, info.mean, info.std, bd=bd_labels)
        augment = Augmentation(crop_padding=args.crop_padding, flip=info.random_flip)
        generator = torch.Generator().manual_seed(args.random_seed)
        self.train_mask(data, augment, generator, logger)
        self.netM.eval()
        self.netM.requires_grad_(False)
        history = self.train_jointly(model, data, augment, generator, logger)
        self.model = model
        return history

    def train_mask(self, data, augment, generator, logger):
        """Mask generator alone: lambda_norm * mean(relu(mask - density)) + lambda_div * diversity of the masks."""
        args, netM = self.args, self.netM
        optimizer = torch.optim.Adam(netM.parameters(), args.lr_M, betas=(0.5, 0.9))
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.schedulerM_milestones, args.schedulerM_lambda)
        scaler = grad_scaler(self.device, args.amp)
        batch_size = args.mask_batch_size or args.batch_size
        batches_per_epoch = -(-len(data) // batch_size)
        for epoch in range(math.ceil(args.mask_epochs)):
            # a fractional last epoch runs that share of the batches (the CPU recipe trains less than one epoch)
            limit = max(1, round(min(1.0, args.mask_epochs - epoch) * batches_per_epoch))
            netM.train()
            sums = torch.zeros(3, device=self.device)
            for step, ((x1, _, _), (x2, _)) in enumerate(paired_batches(data, batch_size, augment, generator)):
                if step == limit:
                    break
                with autocast(self.device, args.amp):
                    masks1, masks2 = threshold(netM(x1)), threshold(netM(x2))
                norm = F.relu(masks1.float() - args.mask_density).mean()
                div = diversity_loss(x1, x2, masks1, masks2, args.EPSILON)
                optimizer_step(args.lambda_norm * norm + args.lambda_div * div, [optimizer], scaler)
                sums += torch.stack([norm.detach(), div.detach(), masks1.detach().float().mean()])
            schedule.step()
            norm, div, density = (sums / limit).tolist()
            logger.info(f"mask epoch {epoch + 1}/{math.ceil(args.mask_epochs)} ({limit} batches): norm {norm:.4f}, "
                        f"diversity {div:.4f}, mean mask {density:.4f}")

    def train_jointly(self, model, data, augment, generator, logger):
        """Classifier (prototype recipe: SGD, lr schedule per batch) and pattern generator (Adam) on mixed batches."""
        args, netG = self.args, self.netG
        recipe = TrainingRecipe.from_options(args)
        optimizer_c = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.sgd_momentum,
                                      weight_decay=recipe.wd, nesterov=recipe.nesterov and recipe.sgd_momentum > 0)
        steps_per_epoch = -(-len(data) // recipe.batch_size)
        schedule_c = torch.optim.lr_scheduler.LambdaLR(optimizer_c,
                                                       lambda step: recipe.lr_factor(step, steps_per_epoch))
        optimizer_g = torch.optim.Adam(netG.parameters(), args.lr_G, betas=(0.5, 0.9))
        schedule_g = torch.optim.lr_scheduler.MultiStepLR(optimizer_g, args.schedulerG_milestones,
                                                          args.schedulerG_lambda)
        scaler = grad_scaler(self.device, recipe.amp)
        clip = None if recipe.grad_clip is None else (list(model.parameters()), recipe.grad_clip)
        history = []
        for epoch in range(recipe.epochs):
            lr, started = optimizer_c.param_groups[0]["lr"], time.perf_counter()
            model.train()
            netG.train()
            loss_sum, batches = torch.zeros((), device=self.device), 0
            # correct predictions and sample counts: all, clean, backdoor (ASR), backdoor (RA), cross
            correct, seen = torch.zeros(5, device=self.device), np.zeros(5)
            for (x1, y1, extra), (x2, _) in paired_batches(data, recipe.batch_size, augment, generator):
                n_bd = min(batch_poison_count(args.pratio, len(y1), self.batch_generator), len(y1) // 2)
                n_mixed = 2 * n_bd  # backdoor samples, then as many cross samples
                with autocast(self.device, recipe.amp):
                    inputs, targets = x1, y1
                    if n_bd:
                        # x1[:n_bd] get their own triggers, x1[n_bd:n_mixed] the triggers of x2[n_bd:n_mixed]
                        sources = torch.cat([x1[:n_bd], x2[n_bd:n_mixed]])
                        patterns = (netG(sources) - data.mean) / data.std
                        with torch.no_grad():
                            masks = threshold(self.netM(sources))
                        inputs = torch.cat([blend(x1[:n_mixed], patterns, masks), x1[n_mixed:]])
                        targets = torch.cat([extra["bd"][:n_bd], y1[n_bd:]])
                    logits = model(inputs)
                    loss = F.cross_entropy(logits, targets, label_smoothing=recipe.label_smoothing)
                if n_bd:
                    loss = loss + args.lambda_div * diversity_loss(x1[:n_bd], x2[n_bd:n_mixed], patterns[:n_bd],
                                                                   patterns[n_bd:], args.EPSILON)
                optimizer_step(loss, [optimizer_c, optimizer_g], scaler, clip)
                schedule_c.step()
                predicted = logits.detach().argmax(1)
                hit, hit_original = predicted == targets, predicted == y1
                correct += torch.stack([hit.sum(), hit[n_mixed:].sum(), hit[:n_bd].sum(), hit_original[:n_bd].sum(),
                                        hit[n_bd:n_mixed].sum()])
                seen += [len(y1), len(y1) - n_mixed, n_bd, n_bd, n_bd]
                loss_sum += loss.detach().float()
                batches += 1
            schedule_g.step()
            shares = (correct.cpu().numpy() / np.maximum(seen, 1)).tolist()
            row = {"epoch": epoch, "batches": batches, "loss": float(loss_sum) / max(batches, 1),
                   "train_acc": shares[0], "train_acc_clean_only": shares[1], "train_asr_bd_only": shares[2],
                   "train_ra_bd_only": shares[3], "train_cross_acc_only": shares[4], "lr": lr,
                   "seconds": time.perf_counter() - started}
            history.append(row)
            self.epochs_done = epoch + 1
            logger.info(f"epoch {epoch + 1}/{recipe.epochs}: loss {row['loss']:.4f}, train_acc {shares[0]:.4f}, "
                        f"clean {shares[1]:.4f}, ASR {shares[2]:.4f}, cross {shares[4]:.4f}, lr {lr:.4g}, "
                        f"{row['seconds']:.1f} s")
        return history

    # ------------------------------------------------------------------ poisoned images
    @torch.inference_mode()
    def stamp(self, images, sources):
        """uint8 NHWC `images` with the triggers the generators make for `sources` (same length), in pixel space:
        x + (G(s) - x) * threshold(M(s)), truncated to uint8 as BackdoorBench's PNGs are."""
        images = np.asarray(images, dtype=np.uint8)
        if len(images) == 0:
            return images.copy()
        self.netG.eval()
        self.netM.eval()
        info, batch = self.info, self.args.eval_batch_size
        source = DeviceImages(sources, np.zeros(len(sources)), self.device, info.mean, info.std)
        target = DeviceImages(images, np.zeros(len(images)), self.device, info.mean, info.std)
        stamped = []
        for start in range(0, len(images), batch):
            x = source.normalise(source.images[start:start + batch])
            pixels = target.images[start:start + batch].permute(0, 3, 1, 2).float()
            out = blend(pixels, self.netG(x).float() * 255, threshold(self.netM(x)).float())
            stamped.append(out.permute(0, 2, 3, 1).cpu().numpy())
        return to_uint8(np.concatenate(stamped)).reshape(images.shape)

    def apply(self, images):
        return self.stamp(images, images)

    def cross(self, images):
        """Each image with the trigger of another one: a random cycle, so no image keeps its own (n > 1)."""
        order = np.random.default_rng(self.args.random_seed).permutation(len(images))
        partner = np.empty_like(order)
        partner[order] = np.roll(order, -1)
        return self.stamp(images, np.asarray(images)[partner])

    # ------------------------------------------------------------------ files
    def extra_files(self, folder):
        """netCGM.pt as BackdoorBench names it: the state dicts netC, netG, netM and the epoch (no optimizer state
        and no args Namespace, so it loads with weights_only=True)."""
        state = {"netG": cpu_state_dict(self.netG), "netM": cpu_state_dict(self.netM), "epoch": self.epochs_done}
        if self.model is not None:
            state["netC"] = cpu_state_dict(self.model)
        torch.save(state, Path(folder) / GENERATORS_FILE)

    def load_generators(self, path, device="cpu"):
        """The generators of a record's netCGM.pt, ready for apply / cross on `device`."""
        state = safe_torch_load(Path(path))
        if not isinstance(state, dict) or "netG" not in state or "netM" not in state:
            raise UserError(f"{path}: expected a dict with netG and netM state dicts")
        self.device = torch.device(device)
        for name in ("netG", "netM"):
            network = load_weights(getattr(self, name), state[name], what=f"{path} ({name})")
            setattr(self, name, prepare_model(network, self.device))
        return self


def check_options(args):
    """Bad values end with one clear message, before any data is read."""
    if args.mask_epochs is None:  # BackdoorBench's YAML names it clean_train_epochs
        args.mask_epochs = args.clean_train_epochs
    args.mask_epochs = float(args.mask_epochs)
    checks = [(args.mask_epochs >= 0, "--mask_epochs must be >= 0"),
              (args.mask_batch_size is None or args.mask_batch_size >= 1, "--mask_batch_size must be >= 1"),
              (args.lr_G > 0 and args.lr_M > 0, "--lr_G and --lr_M must be > 0"),
              (0 < args.mask_density <= 1, "--mask_density must be in (0, 1]"),
              (args.lambda_div >= 0 and args.lambda_norm >= 0, "--lambda_div and --lambda_norm must be >= 0"),
              (args.EPSILON > 0, "--EPSILON must be > 0"),
              (0 <= args.pratio <= 0.5, "--pratio must be in [0, 0.5]: each batch holds as many cross samples as "
                                        "backdoor samples")]
    for good, message in checks:
        if not good:
            raise UserError(message)
    size = dataset_info(args.dataset).img_size
    steps = 2 if args.dataset == "mnist" else 3
    if size[0] % 2 ** steps or size[1] % 2 ** steps:
        raise UserError(f"inputaware's generators need image sides divisible by {2 ** steps}, not {size[:2]}")
    return args


def parse_args(argv=None):
    parser = attack_parser(__doc__.splitlines()[0])
    add = parser.add_argument
    add("--mask_epochs", type=float,
        help="mask generator pre-training epochs (a fraction trains on that share of one epoch); none: "
             "--clean_train_epochs")
    add("--clean_train_epochs", type=float, help="BackdoorBench's name for the mask pre-training epochs")
    add("--mask_batch_size", type=int,
        help="batch size of the mask pre-training (default --batch_size): the mask converges in optimizer steps")
    add("--lr_G", type=float, help="pattern generator Adam learning rate")
    add("--lr_M", type=float, help="mask generator Adam learning rate")
    add("--schedulerG_milestones", type=int, nargs="+", help="epochs where lr_G drops")
    add("--schedulerM_milestones", type=int, nargs="+", help="mask epochs where lr_M drops")
    add("--schedulerG_lambda", type=float, help="lr_G factor at each milestone")
    add("--schedulerM_lambda", type=float, help="lr_M factor at each milestone")
    add("--lambda_div", type=float, help="weight of the diversity losses")
    add("--lambda_norm", type=float, help="weight of the mask sparsity loss")
    add("--mask_density", type=float, help="mask share left unpenalised")
    add("--EPSILON", type=float, help="diversity loss denominator guard")
    return check_options(parse_attack_args(parser, argv, "inputaware"))


def main(argv=None):
    args = parse_args(argv)
    return run_attack(args, dynamic=InputAware(args))


if __name__ == "__main__":
    sys.exit(run_cli(main))
