"""``python -m metalearn``: the commands metalearn offers."""

COMMANDS = """\
metalearn: meta-learning on real few-shot data (Lightning + Hydra).

Commands (each has --help):
  python train.py [key=value ...]                      train and test (a sweep with -m)
  python -m metalearn.report <dir>                     results table and learning curves
  python -m metalearn.adapt ckpt= support= query=      label your own images with a model
  python -m metalearn.evaluate ckpt= [key=value ...]   score a checkpoint without training
  python -m metalearn.show_episode [key=value ...]     draw one episode
  python -m metalearn.show_sinusoid ckpt= [baseline=]  the sinusoid regression figure

Python:
  import metalearn
  metrics = metalearn.train(metalearn.compose(["algo=protonet", "shots=5"]))
  learner = metalearn.load("outputs/.../checkpoints/last.ckpt")
  learner.adapt(images, labels).predict(more_images)
"""

if __name__ == "__main__":
    print(COMMANDS)
