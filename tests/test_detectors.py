"""One interface for every post-hoc detector: a table lookup, fit(features, labels, classifier), score(features, logits)."""
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssod_zoo import scores
from ssod_zoo.detectors import DETECTORS, Detector, create_detector


def _toy(n=64, d=16, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g).relu()
    labels = torch.arange(n) % m
    classifier = nn.Linear(d, m)
    with torch.no_grad():
        classifier.weight.copy_(torch.randn(m, d, generator=g))
        classifier.bias.copy_(torch.randn(m, generator=g))
    return features, labels, classifier


def test_the_defaults_are_the_papers_settings():
    """What README and eval's tables call the papers' settings, written out here, not read from the code: ODIN
    T = 1000 and a step of 0.0014 (Liang et al.), ReAct's clip at the 90th percentile of the ID activations (Sun et
    al.; numpy's percentile as the oracle), KNN's k = 50 (Sun et al. 2022)."""
    import numpy as np
    odin = create_detector('odin')
    assert (odin.temperature, odin.epsilon) == (1000.0, 0.0014)
    features, labels, classifier = _toy(n=200)
    react = create_detector('react').fit(features, labels, classifier)
    clipped = classifier(features.clamp(max=float(np.percentile(features.numpy(), 90))))
    torch.testing.assert_close(react.score(features, None), torch.logsumexp(clipped, 1), rtol=1e-5, atol=1e-5)
    assert create_detector('knn').k == 50


def test_the_table_names_every_detector():
    assert list(DETECTORS) == ['msp', 'maxlogit', 'energy', 'odin', 'react', 'knn', 'mahalanobis', 'vim']
    assert all(issubclass(cls, Detector) for cls in DETECTORS.values())
    with pytest.raises(ValueError, match='unknown detector'):
        create_detector('nope')


@pytest.mark.parametrize('name', ['msp', 'maxlogit', 'energy', 'react', 'knn', 'mahalanobis', 'vim'])
def test_every_detector_scores_through_the_same_two_calls(name):
    features, labels, classifier = _toy()
    with torch.no_grad():
        logits = classifier(features)
    kwargs = {'k': 5} if name == 'knn' else {'dim': 8} if name == 'vim' else {}
    got = create_detector(name, **kwargs).fit(features, labels, classifier).score(features[:10], logits[:10])
    w, b = classifier.weight.detach(), classifier.bias.detach()
    want = {
        'msp': lambda: scores.msp(logits[:10]), 'maxlogit': lambda: scores.max_logit(logits[:10]),
        'energy': lambda: scores.energy(logits[:10]),
        'react': lambda: scores.ReAct().fit(features)(features[:10], w, b),
        'knn': lambda: scores.KNN(k=5).fit(features)(features[:10]),
        'mahalanobis': lambda: scores.Mahalanobis().fit(features, labels)(features[:10]),
        'vim': lambda: scores.ViM(dim=8).fit(features, w, b)(features[:10], logits[:10]),
    }[name]()
    assert got.shape == (10,)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize('name', ['react', 'vim'])
def test_a_classifier_without_bias_is_fine(name):
    features, labels, classifier = _toy()
    no_bias = nn.Linear(classifier.in_features, classifier.out_features, bias=False)
    with torch.no_grad():
        no_bias.weight.copy_(classifier.weight)
        logits = no_bias(features)
    kwargs = {'dim': 8} if name == 'vim' else {}
    out = create_detector(name, **kwargs).fit(features, labels, no_bias).score(features, logits)
    # a missing bias is a zero bias: the scores' own formulas with one
    w, zero = no_bias.weight.detach(), torch.zeros(no_bias.out_features)
    want = (scores.ReAct().fit(features)(features, w, zero) if name == 'react' else
            scores.ViM(dim=8).fit(features, w, zero)(features, logits))
    torch.testing.assert_close(out, want)
    assert torch.isfinite(out).all()


def test_evaluate_a_model_whose_classifier_has_no_bias():
    """`ssod eval` crashed with AttributeError on classifier.bias.detach() for nn.Linear(bias=False)."""
    from ssod_zoo.app.evaluate import evaluate
    torch.manual_seed(0)
    model = timm.create_model('ssod_test_resnet', num_classes=3).eval()
    model.fc = nn.Linear(model.fc.in_features, 3, bias=False)

    def loader(n, seed):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(torch.randn(n, 3, 64, 64, generator=g), torch.arange(n) % 3), batch_size=8)

    results = evaluate(model, loader(12, 0), {'noise': loader(12, 1)}, fit_loader=loader(24, 2), progress=False,
                       methods=('ssod', 'msp', 'react', 'vim'))
    assert set(results['ood']['noise']) >= {'ssod', 'msp', 'react', 'vim'}
    # and the scores are those of the detectors fitted on the same features (a zero bias), finite
    from ssod_zoo.app.evaluate import collect
    from ssod_zoo.app.report import fit_detectors
    fit, test = (collect(model, loader(n, seed), torch.device('cpu')) for n, seed in ((24, 2), (12, 0)))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # ViM's subspace capped for 24 fit images, as evaluate caps it
        fitted = fit_detectors(fit['features'], fit['targets'], model.get_classifier(), methods=('react', 'vim'))
    for method, detector in fitted.items():
        want = detector.score(test['features'], test['logits'])
        assert torch.isfinite(want).all() and torch.isfinite(results['scores'][method]['noise']).all()
        torch.testing.assert_close(results['scores'][method]['id'], want)


def test_odin_scores_images_by_its_formula_and_refuses_features():
    """Liang et al.: one signed step up the log of the tempered MSP, then the tempered MSP, written out here."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.randn(5, 3, 2, 2, generator=g)
    detector = create_detector('odin', temperature=10.0, epsilon=0.01)
    got = detector.score_images(net, x)
    xx = x.clone().requires_grad_(True)
    (net(xx) / 10.0).log_softmax(1).max(1).values.sum().backward()
    with torch.no_grad():
        want = (net(x + 0.01 * xx.grad.sign()) / 10.0).softmax(1).max(1).values
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, (net(x) / 10.0).softmax(1).max(1).values.detach())  # the step moved it
    with pytest.raises(TypeError, match='score_images'):
        detector.score(torch.randn(5, 12), torch.randn(5, 4))
