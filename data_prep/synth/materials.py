"""Shading pattern ids shared by the layout (which assigns them) and the shader."""

from __future__ import annotations

PLAIN = 0  # base colour modulated by noise
ROAD = 1  # ground plane: asphalt, lane markings, zebra crossings, tram rails
SIDEWALK = 2  # paving tiles on top, kerb stone on the road-side face and edge
FACADE = 3  # plaster + windows per floor, shop fronts, roof
FOLIAGE = 4  # two-tone clumpy leaves, darker underneath
GRASS = 5  # grass / soil patches
VEHICLE = 6  # painted body with bumpers, head / tail lights, plate
CABIN = 7  # car greenhouse: side windows with pillars, windscreens, painted roof
WHEEL = 8  # tyre with a metal rim on the side caps
SIGN = 9  # traffic-sign faces (shape codes in params[0])
LIGHT = 10  # traffic-light housing with three lamps (lit lamp in params[0])
FENCE = 11  # vertical planks / bars with rails
WALL = 12  # block courses with staggered joints
BUS = 13  # long vehicle: window band with pillars, windscreen

NUM_PARAMS = 12  # floats of per-primitive pattern parameters
