"""The synthetic world: scenes of coloured shapes with known ground truth, the question
families that ask about them, and the Vision-Flan-format corpus made from them. The demo
corpus, the synthetic evaluation suites and the tiny tokenizer's training text all come
from here, so a model trained on one is tested in the same world."""
from vlit.world.corpus import Task, corpus_tasks, family_scale, synth_corpus, task_sizes
from vlit.world.families import (
                                 CHOICE_LAYOUTS,
                                 FAMILIES,
                                 FAMILY_BY_NAME,
                                 HINTS,
                                 INTROS,
                                 LAYOUTS,
                                 NUMBER_WORDS,
                                 Fact,
                                 Family,
                                 check_family_weights,
                                 family_of,
)
from vlit.world.scenes import (
                                 PALETTE,
                                 POSITIONS,
                                 SHAPES,
                                 SIZES,
                                 WHERE,
                                 WORDS,
                                 Scene,
                                 Shape,
                                 derive_seed,
                                 png,
                                 render_scene,
                                 scene_for,
)

__all__ = ["CHOICE_LAYOUTS", "FAMILIES", "FAMILY_BY_NAME", "HINTS", "INTROS", "LAYOUTS", "NUMBER_WORDS", "PALETTE",
           "POSITIONS", "SHAPES", "SIZES", "WHERE", "WORDS", "Fact", "Family", "Scene", "Shape", "Task",
           "check_family_weights", "corpus_tasks", "derive_seed", "family_of", "family_scale", "png", "render_scene",
           "scene_for", "synth_corpus", "task_sizes"]
