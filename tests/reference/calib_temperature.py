"""Independent reference for tests/unit/test_calib.c: the temperature that
minimises the log loss of a small binary and a small 3-class data set, found
by golden-section search on the loss itself in log T (no derivatives, none of
tallyd's code), plain Python. Run: python3 tests/reference/calib_temperature.py
Prints T, the loss at T and the loss at T = 1 for each set, then the closed
form of a constant prediction 0.9 with 70% positives: T = ln 9 / ln(7/3)."""
import math
EPS=1e-7
def clamp(p): return min(max(p,EPS),1-EPS)
yb=[0.95,0.9,0.85,0.8,0.7,0.65,0.4,0.3,0.2,0.15,0.1,0.05]
lb=[1,1,0,1,0,1,1,0,0,1,0,0]
ym=[[0.7,0.2,0.1],[0.6,0.3,0.1],[0.2,0.5,0.3],[0.1,0.1,0.8],[0.3,0.4,0.3],[0.5,0.25,0.25],[0.05,0.9,0.05],[0.4,0.4,0.2],[0.2,0.2,0.6]]
lm=[0,1,1,2,0,0,1,2,2]
def lossb(T):
    s=0
    for p,t in zip(yb,lb):
        z=math.log(clamp(p))-math.log(1-clamp(p)); a=z/T
        q=1/(1+math.exp(-a)); s-= math.log(q if t else 1-q)
    return s/len(yb)
def lossm(T):
    s=0
    for r,t in zip(ym,lm):
        a=[math.log(clamp(x))/T for x in r]; m=max(a); lse=m+math.log(sum(math.exp(x-m) for x in a))
        s+= lse-a[t]
    return s/len(ym)
def gs(f,lo,hi):
    g=(math.sqrt(5)-1)/2
    a,b=lo,hi
    for _ in range(200):
        c=b-g*(b-a); d=a+g*(b-a)
        if f(math.exp(c))<f(math.exp(d)): b=d
        else: a=c
    return math.exp((a+b)/2)
Tb=gs(lossb,math.log(0.01),math.log(100)); Tm=gs(lossm,math.log(0.01),math.log(100))
print(repr(Tb),repr(lossb(Tb)),repr(lossb(1.0)))
print(repr(Tm),repr(lossm(Tm)),repr(lossm(1.0)))
print(math.log(9)/math.log(7/3))
