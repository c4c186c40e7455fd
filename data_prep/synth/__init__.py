"""Procedural street-scene renderer behind ``data_prep.synthetic``.

Modules, in the order a frame is made:

* ``styles``   -- palettes, lighting and camera ranges of the two domains (city, game);
* ``layout``   -- one random street: road, sidewalks, buildings, vehicles, people, poles...
                  as analytic primitives (boxes, cylinders, ellipsoids) in a world frame;
* ``geometry`` -- cameras and vectorised ray casting with screen-space culling;
* ``noise``    -- hashed value noise and analytically filtered patterns;
* ``materials``-- the shading-pattern ids the layout assigns to primitives;
* ``shading``  -- materials, sun + sky lighting, shadows, haze and tone mapping;
* ``render``   -- ``render_sample``: one frame triplet with exact depth, pose and labels.
"""

from data_prep.synth.render import render_sample

__all__ = ["render_sample"]
